import ConveyorAMQP
import ConveyorCore
import ConveyorHTTP
import ConveyorStore
import Foundation
import Testing

/// `/metrics` of real dispatcher and worker processes, parsed: each metric present with its type,
/// and no label carrying a run id.
@Suite("Prometheus metrics of real processes (real PostgreSQL and RabbitMQ)")
struct MetricsTests {
    /// Families by name: their TYPE and their samples (`name{labels} value`).
    static func parse(_ text: String) -> [String: (type: String, samples: [String])] {
        var out: [String: (type: String, samples: [String])] = [:]
        for line in text.split(separator: "\n").map(String.init) {
            if line.hasPrefix("# TYPE ") {
                let f = line.split(separator: " ")
                if f.count == 4 { out[String(f[2]), default: ("", [])].type = String(f[3]) }
            } else if !line.hasPrefix("#"), let name = line.split(whereSeparator: { $0 == "{" || $0 == " " }).first {
                var family = String(name)
                for suffix in ["_bucket", "_sum", "_count"]
                where family.hasSuffix(suffix) && out[String(family.dropLast(suffix.count))] != nil {
                    family = String(family.dropLast(suffix.count))
                }
                out[family, default: ("", [])].samples.append(line)
            }
        }
        return out
    }

    static func scrape(_ port: Int) async throws -> String {
        var policy = OutboundPolicy()
        policy.allowedNetworks = [try Network(parsing: "127.0.0.1")]
        let r = try await OutboundHTTP(policy: policy, logger: Servers.logger).send(
            OutboundRequest(url: "http://127.0.0.1:\(port)/metrics"), timeout: .seconds(5))
        return String(decoding: r.body, as: UTF8.self)
    }

    @Test func dispatcherAndWorkerExportEveryMetricWithItsType() async throws {
        try await System.with { sys in
            let dispatcherPort = Int.random(in: 20_000...30_000)
            let workerPort = Int.random(in: 30_001...40_000)
            let common = [
                "CONVEYOR_DATABASE_URL": sys.databaseURL, "CONVEYOR_AMQP_URL": sys.dispatcherAMQPURL,
                "CONVEYOR_AMQP_PREFIX": sys.prefix,
            ]
            let dispatcher = try spawnConveyor(
                ["dispatcher"],
                env: common.merging([
                    "CONVEYOR_DISPATCHER_QUEUES": sys.queue,
                    "CONVEYOR_DISPATCHER_HTTP_PORT": "\(dispatcherPort)",
                ]) { a, _ in a })
            var workerEnv = sys.workerEnvironment(id: "metrics-worker", executors: "noop,shell")
            workerEnv["CONVEYOR_WORKER_HTTP_PORT"] = "\(workerPort)"
            let worker = try spawnConveyor(["worker"], env: workerEnv)
            defer { for p in [dispatcher, worker] where p.isRunning { p.terminate() } }

            var tasks = sys.tasks(20, executor: "noop")
            var failing = NewTask(name: "fails", executor: "shell", schedule: .once)
            failing.queue = sys.queue
            failing.parameters = ["argv": ["/bin/false"]]
            failing.retry = try RetryPolicy(maxAttempts: 2, json: ["base_seconds": 0.1, "jitter": false])
            tasks.append(failing)
            try await sys.store.createTasks(tasks)
            _ = try await sys.eventually(timeout: .seconds(60), "every run ends") {
                try await sys.count("SELECT count(*) FROM runs WHERE state IN ('succeeded', 'dead')") == 21
            }
            let d = Self.parse(try await Self.scrape(dispatcherPort))
            for (name, type) in [
                ("conveyor_dispatched_runs_total", "counter"),
                ("conveyor_dispatcher_scan_duration_seconds", "histogram"),
                ("conveyor_dispatcher_claim_batch_size", "histogram"),
                ("conveyor_publish_confirm_seconds", "histogram"),
                ("conveyor_status_lag_seconds", "histogram"), ("conveyor_runs_finished_total", "counter"),
                ("conveyor_retries_total", "counter"), ("conveyor_runs_dead_total", "counter"),
                ("conveyor_queue_depth", "gauge"), ("conveyor_queue_consumers", "gauge"),
                ("conveyor_db_pool_wait_seconds", "histogram"), ("conveyor_db_pool_in_use", "gauge"),
                ("conveyor_amqp_reconnects_total", "counter"), ("conveyor_amqp_blocked", "gauge"),
            ] {
                #expect(d[name]?.type == type, "dispatcher \(name): \(d[name].map { "\($0)" } ?? "missing")")
            }
            #expect(
                d["conveyor_dispatched_runs_total"]?.samples.contains(
                    "conveyor_dispatched_runs_total{queue=\"\(sys.queue)\",priority=\"normal\"} 22") == true,
                "20 + 2 attempts: \(d["conveyor_dispatched_runs_total"]?.samples ?? [])")
            #expect(
                d["conveyor_runs_finished_total"]?.samples.contains(
                    "conveyor_runs_finished_total{outcome=\"succeeded\"} 20") == true,
                "\(d["conveyor_runs_finished_total"]?.samples ?? [])")
            #expect(d["conveyor_retries_total"]?.samples.contains("conveyor_retries_total 1") == true)
            #expect(
                d["conveyor_queue_depth"]?.samples.contains {
                    $0.hasPrefix("conveyor_queue_depth{queue=\"\(sys.queue)\"}")
                } == true)

            let w = Self.parse(try await Self.scrape(workerPort))
            for (name, type) in [
                ("conveyor_executor_duration_seconds", "histogram"), ("conveyor_worker_in_flight", "gauge"),
                ("conveyor_worker_runs_total", "counter"), ("conveyor_worker_amqp_reconnects_total", "counter"),
                ("conveyor_worker_messages_expired_total", "counter"),
                ("conveyor_run_fire_lateness_seconds", "histogram"),
            ] {
                #expect(w[name]?.type == type, "worker \(name): \(w[name].map { "\($0)" } ?? "missing")")
            }
            #expect(
                w["conveyor_executor_duration_seconds"]?.samples.contains {
                    $0.hasPrefix("conveyor_executor_duration_seconds_count{executor=\"noop\"} 20")
                } == true,
                "\(w["conveyor_executor_duration_seconds"]?.samples.filter { $0.contains("_count") } ?? [])")
            // Bounded labels: no run or task id in any sample.
            let uuid = try Regex("[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
            for (name, family) in d.merging(w, uniquingKeysWith: { a, _ in a }) {
                #expect(!family.samples.contains { $0.contains(uuid) }, "\(name) has an id in a label")
            }
        }
    }
}
