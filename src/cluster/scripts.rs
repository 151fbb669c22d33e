//! The Lua scripts docrelay runs in Redis (`docs/cluster.md`, "Scripts").
//! Each touches the keys of one document only (declared in `KEYS`, one hash
//! tag), so each runs atomically on one Redis, or one slot of a Cluster.
//! They are sent with `EVAL` (Redis keeps them compiled by their digest): an
//! `EVALSHA` that meets an empty script cache after a restart could not be
//! retried without reordering a pipeline.

/// Load (and create) a document's head. KEYS: meta, ops, snap.
/// ARGV: the epoch to start if Redis has none. Returns `{epoch, seq}`.
pub const LOAD: &str = r#"
local e = redis.call('HGET', KEYS[1], 'epoch')
if not e then
  e = ARGV[1]
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'epoch', e, 'seq', 0)
end
return {e, tonumber(redis.call('HGET', KEYS[1], 'seq') or 0)}
"#;

/// Sequence one operation. KEYS: meta, ops, snap, channel.
/// ARGV: epoch, origin, frame prefix, frame suffix (the frame is prefix, seq,
/// suffix; with no prefix, the suffix alone), stream length, the epoch
/// to start if Redis lost the document, the operation's token, and "1" when
/// it is sent again after a lost reply (then an entry with its token among
/// the stream's last 1000 is its answer: it is not appended twice).
/// Returns `{seq, epoch}`, or `{0, epoch}` when the epoch is not the
/// caller's (nothing was stored).
pub const APPEND: &str = r#"
local e = redis.call('HGET', KEYS[1], 'epoch')
if not e then
  e = ARGV[6]
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'epoch', e, 'seq', 0)
end
if e ~= ARGV[1] then return {0, e} end
if ARGV[8] == '1' then
  for _, entry in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1000)) do
    local f = entry[2]
    for i = 1, #f, 2 do
      if f[i] == 'k' and f[i + 1] == ARGV[7] then
        local id = entry[1]
        return {tonumber(string.sub(id, 1, string.find(id, '-', 1, true) - 1)), e}
      end
    end
  end
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local frame = ARGV[4]
if ARGV[3] ~= '' then frame = ARGV[3] .. seq .. ARGV[4] end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[5], seq .. '-0', 'f', frame, 'o', ARGV[2], 'k', ARGV[7])
redis.call('PUBLISH', KEYS[4], 'o ' .. e .. ' ' .. seq .. ' ' .. ARGV[2] .. ' ' .. frame)
return {seq, e}
"#;

/// Store a snapshot if it is newer than the held one. KEYS: meta, snap,
/// channel, ops. ARGV: epoch, seq, state, and "1" when the snapshot is a
/// Yjs room's merged state (then the stream's operations up to it, which
/// it holds, are trimmed). Returns `{1, seq}` (stored or older),
/// `{0, epoch}` (another epoch) or `{-1, seq}` (ahead of the document).
pub const SNAPSHOT: &str = r#"
local e = redis.call('HGET', KEYS[1], 'epoch')
if e ~= ARGV[1] then return {0, e or ''} end
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or 0)
local s = tonumber(ARGV[2])
if s > cur then return {-1, cur} end
local held = tonumber(redis.call('HGET', KEYS[2], 'seq') or -1)
if s > held then
  redis.call('HSET', KEYS[2], 'seq', ARGV[2], 'state', ARGV[3])
  redis.call('PUBLISH', KEYS[3], 's ' .. e .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
  if ARGV[4] == '1' then redis.call('XTRIM', KEYS[4], 'MINID', s + 1) end
end
return {1, cur}
"#;

/// List a joined session. KEYS: members, channel. ARGV: connection id,
/// node, participant JSON, announce ("1": publish `user_joined`). Returns
/// every member (`HGETALL`).
pub const JOIN: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
if ARGV[4] == '1' then
  redis.call('PUBLISH', KEYS[2], 'j ' .. ARGV[2] .. ' ' .. ARGV[1] .. ' ' .. ARGV[3])
end
return redis.call('HGETALL', KEYS[1])
"#;

/// Unlist a session and publish its `user_left`, once: only the caller
/// that removes it publishes. KEYS: members, channel. ARGV: connection id,
/// the node it must belong to. Returns 1 if it was listed.
pub const LEAVE: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local sp = string.find(v, ' ', 1, true)
if not sp then redis.call('HDEL', KEYS[1], ARGV[1]) return 0 end
local node = string.sub(v, 1, sp - 1)
if node ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[2], 'l ' .. node .. ' ' .. ARGV[1] .. ' ' .. string.sub(v, sp + 1))
return 1
"#;

/// A node's heartbeat, on Redis's clock. KEYS: nodes. ARGV: node.
pub const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
return 1
"#;

/// Nodes whose last heartbeat is older than ARGV[1] ms, on Redis's clock
/// (at most 16). KEYS: nodes.
pub const DEAD_NODES: &str = r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, 16)
"#;

/// A history that went back: Redis holds fewer operations than a node has
/// delivered (a failover to a replica that had not received the last ones,
/// or a restart that lost the last writes). The document gets a new epoch
/// over what Redis still holds, so that every client reloads it instead of
/// seeing seqs handed out twice. KEYS: meta. ARGV: the epoch seen, the seq
/// delivered, the new epoch. Returns the document's epoch afterwards.
pub const REGRESSED: &str = r#"
local e = redis.call('HGET', KEYS[1], 'epoch')
if e == ARGV[1] and tonumber(redis.call('HGET', KEYS[1], 'seq') or 0) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[3])
  return ARGV[3]
end
return e or ''
"#;
