import ConveyorAPI
import ConveyorCore
import ConveyorStore
import Foundation
import Testing

/// The schema-driven fuzzing pass: schemathesis (from PyPI, another program than ours) reads
/// `openapi.yaml`, generates requests for every operation, valid and invalid, and sends them to
/// the API served over HTTP with a real PostgreSQL behind it. It fails on any 5xx (or a crash,
/// which takes this test process down) and on any documented response whose body does not match
/// its schema. A fixed seed and a bounded number of examples per operation keep it reproducible
/// and inside the CI budget; `CONVEYOR_FUZZ_EXAMPLES` raises the bound for a longer hunt.
@Suite("API fuzzing with schemathesis (real PostgreSQL)", .serialized)
struct APIFuzzTests {
    static var examples: String { ProcessInfo.processInfo.environment["CONVEYOR_FUZZ_EXAMPLES"] ?? "12" }

    @Test func schemathesisFindsNoServerErrorAndNoNonConformingResponse() async throws {
        try await System.with { sys in
            // The per-key limit is for tenants, not for the fuzzer's one key.
            var options = APIOptions()
            options.perKey = .init(rate: 100_000, burst: 100_000)
            try await APITests.withAPI(sys, options: options) { api, _ in
                let admin = try await APITests.key(sys, role: .admin, namespace: "*")
                // Something for the named routes to find, beside what the fuzzer creates.
                try await sys.store.createTasks([NewTask(name: "fuzz-target", executor: "noop", schedule: .manual)])
                let report = FileManager.default.temporaryDirectory.appendingPathComponent("schemathesis-\(UUID())")
                defer { try? FileManager.default.removeItem(at: report) }
                // Two passes: every operation but the event stream, then the stream alone with a short
                // read (a stream never ends by itself; each request reads it until the timeout).
                for (filter, examples, timeout) in [
                    (["--exclude-path", "/v1/events"], Self.examples, "10"),
                    (["--include-path", "/v1/events"], "3", "2"),
                ] {
                    let r = try await runRequired(
                        "python3",
                        [
                            "-m", "schemathesis.cli", "run",
                            FileManager.default.currentDirectoryPath + "/Sources/ConveyorAPI/openapi.yaml",
                            "--url", api.base, "--header", "Authorization: Bearer \(admin)",
                            "--checks", "not_a_server_error,response_schema_conformance",
                            "--seed", "20261202", "--max-examples", examples, "--workers", "1",
                            "--phases", "examples,coverage,fuzzing", "--no-color", "--request-timeout", timeout,
                            "--report", "junit", "--report-dir", report.path,
                        ] + filter)
                    let summary = r.out.split(separator: "\n").suffix(60).joined(separator: "\n")
                    // The figures of docs/security.md (S7): cases generated, failures, seconds.
                    print(
                        "schemathesis \(filter.joined(separator: " ")): "
                            + r.out.split(separator: "\n").filter {
                                $0.contains(" generated") || $0.contains("=====") && $0.contains(" in ")
                            }.joined(separator: " | "))
                    #expect(
                        r.status == 0,
                        "schemathesis found failures (exit \(r.status)):\n\(summary)\n\(r.err.suffix(2000))")
                    #expect(r.out.contains("passed"), "no summary from schemathesis:\n\(summary)")
                }
            }
        }
    }
}
