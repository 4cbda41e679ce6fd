// Enqueue Conveyor work inside your application's own PostgreSQL transaction, from Swift over
// libpq. The task exists if and only if the transaction commits.
//
//     conveyor-example-enqueue 'postgresql://app@db/conveyor' ship-order-42 [--rollback]
//
// Your role needs `conveyor enqueue-grant ROLE --namespace default`; no privilege on any table.
import CLibPQ
import Foundation

/// A line on standard error.
func warn(_ text: String) { FileHandle.standardError.write(Data((text + "\n").utf8)) }

/// Runs `sql` with text parameters; returns the first row, or exits naming the error.
func run(_ conn: OpaquePointer, _ sql: String, _ params: [String] = []) -> [String] {
    var cStrings = params.map { strdup($0) }
    defer { for s in cStrings { free(s) } }
    let result = cStrings.withUnsafeMutableBufferPointer { buffer -> OpaquePointer? in
        buffer.withMemoryRebound(to: UnsafePointer<CChar>?.self) { values in
            PQexecParams(conn, sql, Int32(params.count), nil, values.baseAddress, nil, nil, 0)
        }
    }
    defer { PQclear(result) }
    switch PQresultStatus(result) {
    case PGRES_TUPLES_OK, PGRES_COMMAND_OK:
        guard PQntuples(result) > 0 else { return [] }
        return (0..<PQnfields(result)).map { String(cString: PQgetvalue(result, 0, $0)) }
    default:
        // SQLSTATE 22023 and the field first: "name: 1 to 200 characters, no spaces (got ...)".
        let state = PQresultErrorField(result, Int32(UInt8(ascii: "C"))).map { String(cString: $0) } ?? "?"
        let message = String(cString: PQresultErrorMessage(result))
        warn("refused (\(state)): \(message)")
        exit(2)
    }
}

let args = CommandLine.arguments
guard args.count >= 3 else {
    warn("usage: conveyor-example-enqueue DSN TASK_NAME [--rollback]")
    exit(64)
}
let conn: OpaquePointer
if let c = PQconnectdb(args[1]), PQstatus(c) == CONNECTION_OK {
    conn = c
} else {
    warn("cannot connect to \(args[1])")
    exit(1)
}
defer { PQfinish(conn) }
_ = run(conn, "BEGIN")
// Your own writes go here, in the same transaction.
let row = run(
    conn,
    "SELECT task_id, run_id FROM conveyor_enqueue(name => $1, executor => 'noop', parameters => $2::jsonb)",
    [args[2], #"{"from": "swift"}"#])
if args.contains("--rollback") {
    _ = run(conn, "ROLLBACK")
    print("rolled back: nothing enqueued")
} else {
    _ = run(conn, "COMMIT")
    print("task \(row[0]) run \(row[1])")
}
