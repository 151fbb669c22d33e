//! The names of everything docrelay keeps in Redis (`docs/cluster.md`,
//! "Keys"). The keys of one document share the hash tag `{DOCUMENT}`, so
//! they live in one slot of a Redis Cluster and one script may touch them
//! all. Document ids cannot contain braces (`docs/protocol.md`).

/// `HASH`: `epoch` (16 hex digits) and `seq` (the last operation's).
pub fn meta(document: &str) -> String {
    format!("docrelay:{{{document}}}:meta")
}

/// `STREAM`: one entry per operation, id `SEQ-0`, fields `f` (the
/// operation's broadcast JSON) and `o` (its connection id); trimmed to
/// `cluster.stream_max_ops`.
pub fn ops(document: &str) -> String {
    format!("docrelay:{{{document}}}:ops")
}

/// `HASH`: `seq` and `state` of the latest snapshot.
pub fn snapshot(document: &str) -> String {
    format!("docrelay:{{{document}}}:snap")
}

/// `HASH`: connection id -> `NODE PARTICIPANT_JSON`, every joined session.
pub fn members(document: &str) -> String {
    format!("docrelay:{{{document}}}:members")
}

/// The pub/sub channel of a document: operations, presence, snapshots.
pub fn channel(document: &str) -> String {
    format!("docrelay:{{{document}}}:ch")
}

/// The document of a channel name.
pub fn document_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("docrelay:{")?.strip_suffix("}:ch")
}

/// `ZSET`: node -> the Redis time (ms) of its last heartbeat.
pub const NODES: &str = "docrelay:nodes";

/// `STRING` counter: each node takes a number at start (its connection ids
/// are `number << 32` and up).
pub const NODE_NUMBERS: &str = "docrelay:node-numbers";

/// `SET` of `CONNECTION_ID DOCUMENT`: a node's joined sessions, so that
/// another node can make them leave when it dies.
pub fn node_sessions(node: &str) -> String {
    format!("docrelay:node:{node}:sessions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_documents_keys_share_its_hash_tag() {
        for k in [meta("d1"), ops("d1"), snapshot("d1"), members("d1"), channel("d1")] {
            assert!(k.contains("{d1}"), "{k}");
        }
        assert_eq!(document_of_channel(&channel("a:b.c")), Some("a:b.c"));
        assert_eq!(document_of_channel("other"), None);
    }
}
