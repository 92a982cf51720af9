//! The connection to the store and the scripts run in it.
//!
//! One multiplexed connection per process (redis-rs's connection manager:
//! commands from every worker thread are pipelined on it, and it
//! reconnects by itself), plus one subscriber connection for the event
//! channel. Every operation is bounded by `cluster.store.timeout`; the
//! callers in [`super`] fall back to in-process state when it fails.
//!
//! Each step of the login path is one Lua script, so it is one round trip
//! and atomic: the session count cannot be raced past its limit by two
//! replicas, and a failure's records, distinct names and block change
//! together. Scripts take the time from the store (`TIME`), so replicas
//! with skewed clocks agree on expiries.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, Script};

use crate::config;

/// A login's admission: session count, hold, stickiness, pin.
pub const ADMIT: &str = r#"
-- KEYS: sessions (zset), session info (hash), sticky, pin, hold, pair
-- ARGV: max sessions (0: none), session id, lease ms, familiar ms (0: none)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sticky = redis.call('GET', KEYS[3])
local pin = redis.call('GET', KEYS[4])
if redis.call('EXISTS', KEYS[5]) == 1 then
  return {1, 0, sticky, pin}
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  for _, id in ipairs(gone) do redis.call('HDEL', KEYS[2], id) end
end
local live = redis.call('ZCARD', KEYS[1])
local max = tonumber(ARGV[1])
if max > 0 and live >= max then
  return {2, live, sticky, pin}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[6], 0, 'PX', ARGV[4])
end
return {0, live, sticky, pin}
"#;

/// A session relayed at a backend: its lease, its record, the user's
/// backend. Also each lease's refresh.
pub const REGISTER: &str = r#"
-- KEYS: sessions, session info, sticky
-- ARGV: session id, lease ms, info (JSON), backend, sticky ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
return 1
"#;

/// A session ended (or its login failed after admission): the user's
/// backend is kept `user_expire` after their last session.
pub const RELEASE: &str = r#"
-- KEYS: sessions, session info, sticky
-- ARGV: session id, user expire ms
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[1]) == 0 then
  if tonumber(ARGV[2]) > 0 then
    redis.call('PEXPIRE', KEYS[3], ARGV[2])
  else
    redis.call('DEL', KEYS[3])
  end
end
return 1
"#;

/// A failed login: the records of the network and the user, the pair's
/// familiarity, the network's distinct names and its block.
pub const FAIL: &str = r#"
-- KEYS: network record, user record, network's names (zset), block, pair
-- ARGV: window ms, block_after, block_for ms, user fingerprint ('' none),
--       channel, network, event for a block (JSON)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local function bump(key)
  local last = tonumber(redis.call('HGET', key, 'last') or '0')
  local f = 0
  if now - last <= window then
    f = tonumber(redis.call('HGET', key, 'f') or '0')
  end
  f = f + 1
  redis.call('HSET', key, 'f', f, 'last', now)
  redis.call('PEXPIRE', key, window)
  return f
end
local nf = bump(KEYS[1])
local uf = 0
local blocked = 0
if ARGV[4] ~= '' then
  uf = bump(KEYS[2])
  if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('INCR', KEYS[5]) end
  local after = tonumber(ARGV[2])
  if after > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
    redis.call('ZADD', KEYS[3], now, ARGV[4])
    redis.call('PEXPIRE', KEYS[3], window)
    if redis.call('ZCARD', KEYS[3]) >= after and redis.call('EXISTS', KEYS[4]) == 0 then
      redis.call('SET', KEYS[4], ARGV[6], 'PX', ARGV[3])
      redis.call('DEL', KEYS[3])
      redis.call('PUBLISH', ARGV[5], ARGV[7])
      blocked = 1
    end
  end
end
return {nf, uf, blocked}
"#;

/// A user's live sessions anywhere: their records.
pub const SESSIONS: &str = r#"
-- KEYS: sessions, session info
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(ids))
"#;

pub struct Scripts {
    pub admit: Script,
    pub register: Script,
    pub release: Script,
    pub fail: Script,
    pub sessions: Script,
}

pub struct Store {
    pub conn: ConnectionManager,
    /// For the subscriber connection.
    pub client: Client,
    pub scripts: std::sync::Arc<Scripts>,
}

impl Store {
    /// Builds the client and a connection that connects on first use, so
    /// a store that is down at start delays nothing.
    pub fn open(
        c: &config::Cluster,
        password: Option<&str>,
        ca: Option<Vec<u8>>,
    ) -> Result<Store, String> {
        use redis::IntoConnectionInfo;
        let s = &c.store;
        let mut info = s
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("key `cluster.store.url`: {e}"))?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &s.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = password {
            settings = settings.set_password(password);
        }
        info = info.set_redis_settings(settings);
        let client = match ca {
            Some(pem) => Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
            .map_err(|e| format!("key `cluster.store.ca_file`: {e}"))?,
            None => Client::open(info).map_err(|e| format!("key `cluster.store.url`: {e}"))?,
        };
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("key `cluster.store`: {e}"))?;
        Ok(Store {
            conn,
            client,
            scripts: std::sync::Arc::new(Scripts {
                admit: Script::new(ADMIT),
                register: Script::new(REGISTER),
                release: Script::new(RELEASE),
                fail: Script::new(FAIL),
                sessions: Script::new(SESSIONS),
            }),
        })
    }
}
