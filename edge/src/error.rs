use std::fmt;

/// Why a read could not be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeError {
    /// Redis answered with an error (e.g. `NOGPU ...`): the message as Redis sent it.
    Server(String),
    /// Redis could not be reached or the connection failed.
    Connection(String),
    /// A reply this crate cannot read.
    Reply(String),
    /// The server lacks what the call needs (e.g. `WAITAOF` before Redis 7.2); nothing was done.
    Unsupported(String),
}

impl fmt::Display for EdgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EdgeError::Server(m) => write!(f, "redis: {m}"),
            EdgeError::Connection(m) => write!(f, "connection: {m}"),
            EdgeError::Reply(m) => write!(f, "reply: {m}"),
            EdgeError::Unsupported(m) => write!(f, "unsupported: {m}"),
        }
    }
}

impl std::error::Error for EdgeError {}

impl From<redis::RedisError> for EdgeError {
    fn from(e: redis::RedisError) -> Self {
        if e.kind() == redis::ErrorKind::IoError || e.is_connection_dropped() || e.is_timeout() {
            EdgeError::Connection(e.to_string())
        } else if let Some(code) = e.code() {
            EdgeError::Server(format!("{code} {}", e.detail().unwrap_or_default()))
        } else {
            EdgeError::Server(e.to_string())
        }
    }
}
