-- Issue 24: an AuditEvent's codes and names (type, subtype, action, the agents' names, roles,
-- ids, addresses and policies, the entities' names, types and roles, the source's site) have no
-- index rows any more: a search checks them on the bodies of the candidates its other
-- conditions select (crates/store/src/search/mod.rs, UNSTORED). Short names (names.rs):
-- '1' action, '2' address, '4' agent-name, '5' agent-role, '6' altid, '9' entity-name,
-- '10' entity-role, '11' entity-type, '14' policy, '15' site, '17' subtype, '18' type.
DELETE FROM idx_token WHERE param IN ('1', '5', '6', '10', '11', '14', '15', '17', '18');
DELETE FROM idx_string WHERE param IN ('2', '4', '9');
