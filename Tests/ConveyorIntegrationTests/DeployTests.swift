import Foundation
import Testing

/// The Dockerfile's build script, docker-compose.yml and the Kubernetes overlays, checked offline
/// by scripts/validate_deploy.py: schemas, and agreement with what the binaries read.
@Suite("deployment files (docker-compose config, kustomize, Kubernetes schemas)")
struct DeployTests {
    static func validate(_ root: String) throws -> (status: Int32, out: String) {
        let p = try Process.required(
            "python3", [FileManager.default.currentDirectoryPath + "/scripts/validate_deploy.py", root])
        let r = try runCapturing(p)
        return (r.status, r.out + r.err)
    }

    @Test func theFilesAsCommittedAreValid() throws {
        let r = try Self.validate(FileManager.default.currentDirectoryPath)
        #expect(r.status == 0, "\(r.out)")
        #expect(r.out.contains("0 problem(s)"))
    }

    /// The validator sees each kind of mistake: a copy of the files, broken on purpose.
    @Test func eachKindOfMistakeIsCaught() throws {
        let fm = FileManager.default
        let here = fm.currentDirectoryPath
        let root = fm.temporaryDirectory.appendingPathComponent("deploy-\(UUID())").path
        defer { try? fm.removeItem(atPath: root) }
        try fm.createDirectory(atPath: root, withIntermediateDirectories: true)
        for item in ["deploy", "config", "docs", "Sources", "docker-compose.yml"] {
            try fm.copyItem(atPath: "\(here)/\(item)", toPath: "\(root)/\(item)")
        }
        func edit(_ file: String, _ from: String, _ to: String) throws {
            let path = "\(root)/\(file)"
            let text = try String(contentsOfFile: path, encoding: .utf8)
            #expect(text.contains(from), "\(file) no longer contains \(from)")
            try text.replacingOccurrences(of: from, with: to).write(toFile: path, atomically: true, encoding: .utf8)
        }
        try edit("deploy/base/worker.yaml", "path: /readyz, port: status}", "path: /ready, port: status}")
        try edit("deploy/base/worker.yaml", "terminationGracePeriodSeconds: 35", "terminationGracePeriodSeconds: 20")
        try edit(
            "deploy/base/api.yaml", "{name: CONVEYOR_LOG_FORMAT, value: json}",
            "{name: CONVEYOR_LOG_FROMAT, value: json}")
        try edit(
            "deploy/base/api.yaml", "terminationGracePeriodSeconds: 20",
            "terminationGracePeriodSeconds: 20\n      restartPolicyy: Always")
        try edit("deploy/base/dispatcher.yaml", "containerPort: 9090", "containerPort: 9000")
        try edit(
            "deploy/components/keda/worker-scaledobject.yaml", "queueName: conveyor.q.default", "queueName: default")
        try edit("deploy/components/keda/worker-scaledobject.yaml", "protocol: http", "protocol: amqp")
        try edit("docker-compose.yml", "CONVEYOR_LOG_FORMAT: json", "CONVEYOR_LOGFORMAT: json")
        let rules = "deploy/components/prometheus-operator/prometheusrule.yaml"
        try edit(
            rules, "sum(increase(conveyor_runs_dead_total[15m])) > 0", "sum(increase(conveyor_runs_dead_total[15m]) > 0"
        )
        try edit(rules, "docs/operations.md#conveyordeadletters", "docs/operations.md#no-such-section")
        try edit(
            "deploy/components/prometheus-operator/conveyor.json", "max(conveyor_amqp_blocked)",
            "max(conveyor_amqp_blockd)")
        try edit("deploy/base/migrate-job.yaml", "name: conveyor-migrate-0-10-0", "name: conveyor-migrate")
        try edit(
            "deploy/base/dispatcher.yaml", "automountServiceAccountToken: false", "automountServiceAccountToken: true")
        try edit("deploy/base/config/api.yaml", "port: 8080", "port: 8081")
        let r = try Self.validate(root)
        #expect(r.status == 1)
        for expected in [
            "Deployment/conveyor-worker: readinessProbe path /ready is not served",
            "Deployment/conveyor-worker: terminationGracePeriodSeconds must exceed worker.shutdown_grace_ms (25 s)",
            "Deployment/conveyor-api: CONVEYOR_LOG_FROMAT is not read by any Conveyor binary",
            """
            Deployment/conveyor-api: spec.template.spec: Additional properties are not allowed ('restartPolicyy' was \
            unexpected)
            """,
            "Deployment/conveyor-dispatcher: container port is not dispatcher's configured port 9090",
            """
            ScaledObject/conveyor-worker: rabbitmq triggers watch ['conveyor.isolated.default', 'default'], not the \
            work queue and its isolation lane
            """,
            "ScaledObject/conveyor-worker: protocol must be http: over AMQP KEDA counts ready messages only",
            "docker-compose.yml worker: CONVEYOR_LOGFORMAT is not read by any Conveyor binary",
            "deploy/base/config/api.yaml: differs from config/api.yaml",
            "PrometheusRule/conveyor: promtool check rules:",
            "alert ConveyorDeadLetters: runbook_url 'docs/operations.md#no-such-section' is not a section",
            "queries conveyor_amqp_blockd, which docs/observability.md does not list",
            "deploy/overlays/plain: no Job conveyor-migrate-0-10-0",
            "Deployment/conveyor-dispatcher: runs as ServiceAccount conveyor with automountServiceAccountToken: false",
        ] {
            #expect(r.out.contains(expected), "missing '\(expected)' in:\n\(r.out)")
        }
    }
}
