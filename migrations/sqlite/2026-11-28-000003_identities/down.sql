DROP TABLE identity_conflicts;
DROP TABLE identity_identifiers;
DROP TABLE identity_links;
DROP TABLE identities;
