import CRabbitMQ
import Foundation

/// A value in an AMQP field table (message headers, queue arguments).
package enum AMQPValue: Sendable, Hashable {
    case string(String)
    case int(Int64)
    case bool(Bool)
    case double(Double)
    case bytes([UInt8])
    case table([String: AMQPValue])
    case array([AMQPValue])
    case timestamp(UInt64)
    case void

    package var stringValue: String? {
        switch self {
        case .string(let s): s
        case .bytes(let b): String(decoding: b, as: UTF8.self)
        default: nil
        }
    }

    package var intValue: Int64? { if case .int(let i) = self { i } else { nil } }
    package var tableValue: [String: AMQPValue]? { if case .table(let t) = self { t } else { nil } }
}

/// Message headers.
package typealias AMQPHeaders = [String: AMQPValue]

/// C memory for one outgoing frame's tables and strings, freed together.
final class CArena {
    private var pointers: [UnsafeMutableRawPointer] = []

    deinit { for p in pointers { free(p) } }

    func bytes(_ s: String) -> amqp_bytes_t { bytes(Array(s.utf8)) }

    func bytes(_ b: [UInt8]) -> amqp_bytes_t {
        guard !b.isEmpty, let p = malloc(b.count) else { return amqp_bytes_t(len: 0, bytes: nil) }
        pointers.append(p)
        b.withUnsafeBytes { src in p.copyMemory(from: src.baseAddress!, byteCount: b.count) }
        return amqp_bytes_t(len: b.count, bytes: p)
    }

    func table(_ dict: [String: AMQPValue]) -> amqp_table_t {
        guard !dict.isEmpty else { return amqp_table_t(num_entries: 0, entries: nil) }
        let raw = malloc(MemoryLayout<amqp_table_entry_t>.stride * dict.count)!
        pointers.append(raw)
        let entries = raw.bindMemory(to: amqp_table_entry_t.self, capacity: dict.count)
        for (i, (k, v)) in dict.sorted(by: { $0.key < $1.key }).enumerated() {
            (entries + i).initialize(to: amqp_table_entry_t(key: bytes(k), value: field(v)))
        }
        return amqp_table_t(num_entries: Int32(dict.count), entries: entries)
    }

    func field(_ v: AMQPValue) -> amqp_field_value_t {
        func kind(_ k: amqp_field_value_kind_t) -> UInt8 { UInt8(k.rawValue) }
        switch v {
        case .string(let s): return amqp_field_value_t(kind: kind(AMQP_FIELD_KIND_UTF8), value: .init(bytes: bytes(s)))
        case .bytes(let b): return amqp_field_value_t(kind: kind(AMQP_FIELD_KIND_BYTES), value: .init(bytes: bytes(b)))
        case .int(let i): return amqp_field_value_t(kind: kind(AMQP_FIELD_KIND_I64), value: .init(i64: i))
        case .bool(let b):
            return amqp_field_value_t(kind: kind(AMQP_FIELD_KIND_BOOLEAN), value: .init(boolean: b ? 1 : 0))
        case .double(let d): return amqp_field_value_t(kind: kind(AMQP_FIELD_KIND_F64), value: .init(f64: d))
        case .timestamp(let t): return amqp_field_value_t(kind: kind(AMQP_FIELD_KIND_TIMESTAMP), value: .init(u64: t))
        case .table(let t): return amqp_field_value_t(kind: kind(AMQP_FIELD_KIND_TABLE), value: .init(table: table(t)))
        case .void: return amqp_field_value_t(kind: kind(AMQP_FIELD_KIND_VOID), value: .init(i64: 0))
        case .array(let a):
            guard !a.isEmpty else {
                return amqp_field_value_t(
                    kind: kind(AMQP_FIELD_KIND_ARRAY), value: .init(array: amqp_array_t(num_entries: 0, entries: nil)))
            }
            let raw = malloc(MemoryLayout<amqp_field_value_t>.stride * a.count)!
            pointers.append(raw)
            let entries = raw.bindMemory(to: amqp_field_value_t.self, capacity: a.count)
            for (i, e) in a.enumerated() { (entries + i).initialize(to: field(e)) }
            return amqp_field_value_t(
                kind: kind(AMQP_FIELD_KIND_ARRAY),
                value: .init(array: amqp_array_t(num_entries: Int32(a.count), entries: entries)))
        }
    }
}

extension amqp_bytes_t {
    /// A copy of the bytes (the C memory is gone after the frame is released).
    var array: [UInt8] {
        guard len > 0, let bytes else { return [] }
        return Array(UnsafeRawBufferPointer(start: bytes, count: len))
    }

    var string: String { String(decoding: array, as: UTF8.self) }
}

enum CTableReader {
    static func table(_ t: amqp_table_t) -> [String: AMQPValue] {
        var out: [String: AMQPValue] = [:]
        guard t.num_entries > 0, let entries = t.entries else { return out }
        for i in 0..<Int(t.num_entries) {
            let e = entries[i]
            out[e.key.string] = value(e.value)
        }
        return out
    }

    static func value(_ f: amqp_field_value_t) -> AMQPValue {
        switch amqp_field_value_kind_t(UInt32(f.kind)) {
        case AMQP_FIELD_KIND_UTF8: return .string(f.value.bytes.string)
        case AMQP_FIELD_KIND_BYTES: return .bytes(f.value.bytes.array)
        case AMQP_FIELD_KIND_BOOLEAN: return .bool(f.value.boolean != 0)
        case AMQP_FIELD_KIND_I8: return .int(Int64(f.value.i8))
        case AMQP_FIELD_KIND_U8: return .int(Int64(f.value.u8))
        case AMQP_FIELD_KIND_I16: return .int(Int64(f.value.i16))
        case AMQP_FIELD_KIND_U16: return .int(Int64(f.value.u16))
        case AMQP_FIELD_KIND_I32: return .int(Int64(f.value.i32))
        case AMQP_FIELD_KIND_U32: return .int(Int64(f.value.u32))
        case AMQP_FIELD_KIND_I64: return .int(f.value.i64)
        case AMQP_FIELD_KIND_U64: return .int(Int64(truncatingIfNeeded: f.value.u64))
        case AMQP_FIELD_KIND_F32: return .double(Double(f.value.f32))
        case AMQP_FIELD_KIND_F64: return .double(f.value.f64)
        case AMQP_FIELD_KIND_TIMESTAMP: return .timestamp(f.value.u64)
        case AMQP_FIELD_KIND_TABLE: return .table(table(f.value.table))
        case AMQP_FIELD_KIND_ARRAY:
            let a = f.value.array
            guard a.num_entries > 0, let entries = a.entries else { return .array([]) }
            return .array((0..<Int(a.num_entries)).map { value(entries[$0]) })
        default: return .void
        }
    }
}
