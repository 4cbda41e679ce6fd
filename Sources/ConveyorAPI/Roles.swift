package import ConveyorCore

/// Who may do what through the API.
package enum Role: String, Sendable, CaseIterable, Comparable {
    case viewer, submitter, `operator`, admin

    var rank: Int { Self.allCases.firstIndex(of: self) ?? 0 }
    package static func < (a: Role, b: Role) -> Bool { a.rank < b.rank }
}

/// What a new API key may be, for every way of making one (`conveyor apikey create`,
/// `POST /v1/keys`, `conveyorctl key create`). `fields` names the inputs as the caller spells them.
package enum APIKeyRules {
    package static func check(
        role: String, namespace: String, expiresDays: Int?,
        fields: (role: String, namespace: String, expiresDays: String)
    ) throws(ValidationError) -> Role {
        guard let r = Role(rawValue: role) else {
            throw ValidationError(field: fields.role, value: role, hint: "one of admin, operator, submitter, viewer")
        }
        // Every namespace: to administer all, or to read all (a fleet viewer: dashboards of the
        // whole fleet, a Prometheus scraper). Never to submit or operate in all at once.
        guard namespace != "*" || r == .admin || r == .viewer else {
            throw ValidationError(
                field: fields.namespace, value: namespace,
                hint: "'*' (every namespace) is for admin and viewer keys only")
        }
        guard
            namespace == "*"
                || (!namespace.isEmpty && namespace.count <= 63
                    && namespace.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }))
        else {
            throw ValidationError(
                field: fields.namespace, value: namespace, hint: "letters, digits, '-' and '_', at most 63")
        }
        if let d = expiresDays, !(1...3650).contains(d) {
            throw ValidationError(
                field: fields.expiresDays, value: String(d), hint: "a whole number of days from 1 to 3650")
        }
        return r
    }
}
