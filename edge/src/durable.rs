//! Bookings that are confirmed only once they are durable.
//!
//! Redis replicates asynchronously: a `GPUCACHE.BOOK` reply means the primary applied the
//! booking, not that any replica or disk has it. A primary that dies right after the reply can
//! take the booking along, and the replica promoted in its place never saw it. [`book_durably`]
//! runs the booking and then, on the same connection, `WAIT <replicas> <timeout>` (and
//! `WAITAOF <local> <replicas> <timeout>` on Redis 7.2+ when the caller asks for AOF fsyncs),
//! and reports [`BookOutcome::Durable`] only when as many replicas / AOFs acknowledged the
//! booking as the caller's [`Durability`] requires.
//!
//! ```no_run
//! use gpucache_edge::connect::{self, TlsConfig};
//! use gpucache_edge::durable::{book_durably, BookOutcome, BookRequest, Durability};
//! use std::time::Duration;
//! // Over TLS: connect::connection("rediss://10.0.0.5:6380/", &TlsConfig::with_ca_file("ca.pem"))
//! let mut con = connect::connection("redis://10.0.0.5:6379/", &TlsConfig::default())?;
//! let request = BookRequest::new("eu-west", "a100-1", "order-81723", "alice", 3600);
//! let durability = Durability::replicas(1, Duration::from_millis(500));
//! match book_durably(&mut con, &request, &durability)? {
//!     BookOutcome::Durable { booking, .. } => println!("booked at {}", booking.price),
//!     BookOutcome::NotDurable { reason, .. } => {
//!         // Not confirmed: retry the same request (booking ids are idempotent), never tell
//!         // the customer "booked" yet.
//!         eprintln!("not durable yet: {reason}");
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **What to do with [`BookOutcome::NotDurable`]**: the booking exists on the primary but could
//! still be lost by a failover. Do not confirm it. Call [`book_durably`] again with the *same*
//! request (same booking id, GPU, user and duration): `GPUCACHE.BOOK` is idempotent for a
//! repeated id — it returns the booking with `result` `existing`, or books it again if a
//! failover lost it — and the helper waits again. Tell the customer "booked" only after a
//! `Durable` outcome; if it never comes (replicas down for longer than you can wait), cancel
//! the booking (`GPUCACHE.CANCEL`) or keep it pending, as the business prefers.
//!
//! **Errors**: a refused booking (`GPUBUSY`, `NOGPU`, `GPUUNAVAILABLE`, `BOOKINGEXISTS`, `OOM`,
//! ...) is `Err(EdgeError::Server(..))`, as Redis sent it. A connection that fails during the
//! `BOOK` itself is `Err(EdgeError::Connection(..))`: the booking may or may not have been made,
//! so retry the same request on a new connection. A failure after the booking was made (during
//! `WAIT`/`WAITAOF`) is a `NotDurable` outcome with [`Shortfall::WaitFailed`], so the booking's
//! details are not lost; discard that connection (a late reply could still arrive on it).
//!
//! The connection's read timeout, if any, must be longer than [`Durability::timeout`]: `WAIT`
//! holds the reply for up to that long.

use crate::error::EdgeError;
use redis::{ConnectionLike, Value};
use std::fmt;
use std::time::{Duration, Instant};

/// The arguments of `GPUCACHE.BOOK region gpu_id booking_id user_id duration_s`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookRequest {
    pub region: String,
    pub gpu_id: String,
    /// Chosen by the application (e.g. its order id), so that a retry repeats it.
    pub booking_id: String,
    pub user_id: String,
    pub duration_s: u64,
}

impl BookRequest {
    pub fn new(
        region: &str,
        gpu_id: &str,
        booking_id: &str,
        user_id: &str,
        duration_s: u64,
    ) -> BookRequest {
        BookRequest {
            region: region.to_string(),
            gpu_id: gpu_id.to_string(),
            booking_id: booking_id.to_string(),
            user_id: user_id.to_string(),
            duration_s,
        }
    }
}

/// What "durable" means to the caller: how many copies must acknowledge a booking before it
/// may be confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    /// Replicas that must have received the booking (`WAIT <replicas>`). 0 asks for none.
    pub replicas: u32,
    /// The primary must have fsynced the booking to its AOF (`WAITAOF 1 ..`; Redis 7.2+ with
    /// `appendonly yes`).
    pub aof_local: bool,
    /// Replicas that must have fsynced the booking to their AOF (`WAITAOF .. <n>`; Redis 7.2+).
    pub aof_replicas: u32,
    /// How long to wait for all of the above together, counted from the `BOOK` reply. Never
    /// sent as 0 (which `WAIT` reads as "forever"): it is rounded up to at least 1 ms.
    pub timeout: Duration,
}

impl Durability {
    /// Durable once `replicas` replicas have received the booking.
    pub fn replicas(replicas: u32, timeout: Duration) -> Durability {
        Durability {
            replicas,
            aof_local: false,
            aof_replicas: 0,
            timeout,
        }
    }

    /// Also require the primary's own AOF fsync (Redis 7.2+).
    pub fn with_local_aof(mut self) -> Durability {
        self.aof_local = true;
        self
    }

    /// Also require `replicas` replicas' AOF fsyncs (Redis 7.2+).
    pub fn with_aof_replicas(mut self, replicas: u32) -> Durability {
        self.aof_replicas = replicas;
        self
    }

    /// True when `WAITAOF` is needed.
    pub fn needs_aof(&self) -> bool {
        self.aof_local || self.aof_replicas > 0
    }

    /// The first requirement `acks` does not meet, if any.
    pub fn shortfall(&self, acks: &Acks) -> Option<Shortfall> {
        if acks.replicas < u64::from(self.replicas) {
            return Some(Shortfall::Replicas {
                acknowledged: acks.replicas,
                required: self.replicas,
            });
        }
        if !self.needs_aof() {
            return None;
        }
        let Some(aof) = acks.aof else {
            return Some(Shortfall::WaitFailed(EdgeError::Reply(
                "no WAITAOF reply".into(),
            )));
        };
        if self.aof_local && !aof.local {
            return Some(Shortfall::LocalAof);
        }
        if aof.replicas < u64::from(self.aof_replicas) {
            return Some(Shortfall::AofReplicas {
                acknowledged: aof.replicas,
                required: self.aof_replicas,
            });
        }
        None
    }
}

/// `GPUCACHE.BOOK`'s `result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BookingResult {
    /// This call made the booking.
    Created,
    /// The booking id was already booked with the same GPU, user and duration (a retry).
    Existing,
}

/// `GPUCACHE.BOOK`'s reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booking {
    pub booking_id: String,
    pub result: BookingResult,
    pub gpu_id: String,
    pub user_id: String,
    /// Hourly price, an exact decimal as the module sent it.
    pub price: String,
    pub duration_s: u64,
    pub start_ms: i64,
    pub end_ms: i64,
    /// price × hours, an exact decimal as the module sent it.
    pub cost: String,
    pub gpu_version: i64,
}

/// Acknowledgements received for a booking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Acks {
    /// Replicas that acknowledged the booking (`WAIT`'s reply).
    pub replicas: u64,
    /// `WAITAOF`'s reply, when AOF durability was asked for and `WAIT` had succeeded.
    pub aof: Option<AofAcks>,
}

/// `WAITAOF`'s reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AofAcks {
    /// The primary fsynced the booking to its AOF.
    pub local: bool,
    /// Replicas that fsynced the booking to their AOF.
    pub replicas: u64,
}

/// Why a booking that was made is not (yet) known to be durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shortfall {
    /// Fewer replicas than required acknowledged within the timeout.
    Replicas { acknowledged: u64, required: u32 },
    /// The primary did not confirm its AOF fsync within the timeout.
    LocalAof,
    /// Fewer replicas than required confirmed their AOF fsync within the timeout.
    AofReplicas { acknowledged: u64, required: u32 },
    /// The booking was made but waiting for it failed (connection lost, `WAITAOF` refused, e.g.
    /// with `appendonly no`, an ACL without `+wait`/`+waitaof`, ...): durability is unknown.
    WaitFailed(EdgeError),
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shortfall::Replicas {
                acknowledged,
                required,
            } => write!(f, "{acknowledged} of {required} replicas acknowledged"),
            Shortfall::LocalAof => write!(f, "the primary's AOF fsync was not confirmed"),
            Shortfall::AofReplicas {
                acknowledged,
                required,
            } => write!(
                f,
                "{acknowledged} of {required} replica AOF fsyncs confirmed"
            ),
            Shortfall::WaitFailed(e) => write!(f, "waiting for acknowledgements failed: {e}"),
        }
    }
}

/// A booking that was made, and whether it may be confirmed.
#[must_use = "a NotDurable booking must not be confirmed to the customer"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BookOutcome {
    /// As many copies as required acknowledged the booking: confirm it.
    Durable { booking: Booking, acks: Acks },
    /// The primary made the booking but it could still be lost: do not confirm it; retry the
    /// same request (see the [module documentation](self)).
    NotDurable {
        booking: Booking,
        acks: Acks,
        reason: Shortfall,
    },
}

impl BookOutcome {
    pub fn is_durable(&self) -> bool {
        matches!(self, BookOutcome::Durable { .. })
    }

    pub fn booking(&self) -> &Booking {
        match self {
            BookOutcome::Durable { booking, .. } | BookOutcome::NotDurable { booking, .. } => {
                booking
            }
        }
    }

    pub fn acks(&self) -> &Acks {
        match self {
            BookOutcome::Durable { acks, .. } | BookOutcome::NotDurable { acks, .. } => acks,
        }
    }
}

/// Books a GPU and waits until the booking is durable by `durability`'s standard, on `con`
/// (a connection to the primary that holds the region).
///
/// Steps: if `durability` needs `WAITAOF`, the server's version is read first (`HELLO`, or
/// `INFO server`) and a server older than 7.2 is refused with `EdgeError::Unsupported` before
/// anything is booked. Then `GPUCACHE.BOOK`; its errors are returned as they are. A `created`
/// booking is this connection's last write, so `WAIT` covers it. An `existing` one (a retry)
/// writes nothing, but the module replicates a `PING` for it: `WAIT` waits for the replication
/// offset the connection's commands last moved (Redis 7.2 and later move it only on commands
/// that propagated something), so the wait covers everything the primary had applied, the
/// original booking included, on every version. Then `WAIT` and, if it met the requirement and
/// AOF is asked for, `WAITAOF`, both within `durability.timeout`.
pub fn book_durably<C: ConnectionLike>(
    con: &mut C,
    request: &BookRequest,
    durability: &Durability,
) -> Result<BookOutcome, EdgeError> {
    if durability.needs_aof() {
        if let Some(version) = server_version(con) {
            if !has_waitaof(version) {
                let (major, minor, patch) = version;
                return Err(EdgeError::Unsupported(format!(
                    "AOF durability needs WAITAOF (Redis 7.2+); this server is {major}.{minor}.{patch}"
                )));
            }
        }
        // Version unknown: WAITAOF is tried, and its error is reported as `WaitFailed`.
    }

    let reply = redis::cmd("GPUCACHE.BOOK")
        .arg(&request.region)
        .arg(&request.gpu_id)
        .arg(&request.booking_id)
        .arg(&request.user_id)
        .arg(request.duration_s)
        .query::<Value>(con)?;
    let booking = parse_booking(&reply)?;
    let deadline = Instant::now() + durability.timeout;

    let mut acks = Acks::default();
    let waited = wait_for_acks(con, durability, deadline, &mut acks);
    let shortfall = match waited {
        Ok(()) => durability.shortfall(&acks),
        Err(e) => Some(Shortfall::WaitFailed(e)),
    };
    Ok(match shortfall {
        None => BookOutcome::Durable { booking, acks },
        Some(reason) => BookOutcome::NotDurable {
            booking,
            acks,
            reason,
        },
    })
}

fn wait_for_acks<C: ConnectionLike>(
    con: &mut C,
    durability: &Durability,
    deadline: Instant,
    acks: &mut Acks,
) -> Result<(), EdgeError> {
    let replicas: i64 = redis::cmd("WAIT")
        .arg(durability.replicas)
        .arg(timeout_ms(deadline))
        .query(con)?;
    acks.replicas = u64::try_from(replicas).unwrap_or(0);
    if !durability.needs_aof() || acks.replicas < u64::from(durability.replicas) {
        return Ok(());
    }
    let reply: Value = redis::cmd("WAITAOF")
        .arg(u8::from(durability.aof_local))
        .arg(durability.aof_replicas)
        .arg(timeout_ms(deadline))
        .query(con)?;
    acks.aof = Some(parse_waitaof(&reply)?);
    Ok(())
}

/// Milliseconds left until `deadline`, rounded up, at least 1 (`WAIT 0` would never return).
fn timeout_ms(deadline: Instant) -> u64 {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = left.as_micros().div_ceil(1000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// True if a server of this version has `WAITAOF`.
fn has_waitaof((major, minor, _): (u64, u64, u64)) -> bool {
    (major, minor) >= (7, 2)
}

/// The server's version from `HELLO` (no arguments: the protocol is unchanged), or from `INFO
/// server` if `HELLO` fails; `None` if neither can be read.
fn server_version<C: ConnectionLike>(con: &mut C) -> Option<(u64, u64, u64)> {
    if let Ok(reply) = redis::cmd("HELLO").query::<Value>(con) {
        if let Some(version) = field(&reply, "version").and_then(|v| text(v).ok()) {
            return parse_version(&version);
        }
    }
    let info: String = redis::cmd("INFO").arg("server").query(con).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .and_then(|v| parse_version(v.trim()))
}

fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let mut parts = text.split('.').map(|p| p.parse::<u64>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

fn parse_waitaof(reply: &Value) -> Result<AofAcks, EdgeError> {
    match reply {
        Value::Array(items) => match items.as_slice() {
            [Value::Int(local), Value::Int(replicas)] => Ok(AofAcks {
                local: *local > 0,
                replicas: u64::try_from(*replicas).unwrap_or(0),
            }),
            _ => Err(EdgeError::Reply(format!("WAITAOF replied {reply:?}"))),
        },
        other => Err(EdgeError::Reply(format!("WAITAOF replied {other:?}"))),
    }
}

/// A reply map's field: RESP3 map or RESP2 flat field/value array.
fn field<'a>(reply: &'a Value, name: &str) -> Option<&'a Value> {
    let matches = |k: &Value| text(k).is_ok_and(|k| k == name);
    match reply {
        Value::Map(pairs) => pairs.iter().find(|(k, _)| matches(k)).map(|(_, v)| v),
        Value::Array(items) => items
            .chunks_exact(2)
            .find(|pair| matches(&pair[0]))
            .map(|pair| &pair[1]),
        _ => None,
    }
}

fn text(value: &Value) -> Result<String, EdgeError> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone())
            .map_err(|_| EdgeError::Reply("a reply field is not UTF-8".into())),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::VerbatimString { text, .. } => Ok(text.clone()),
        Value::Int(n) => Ok(n.to_string()),
        other => Err(EdgeError::Reply(format!("expected text, got {other:?}"))),
    }
}

fn parse_booking(reply: &Value) -> Result<Booking, EdgeError> {
    let get = |name: &str| {
        field(reply, name)
            .ok_or_else(|| EdgeError::Reply(format!("BOOK reply without `{name}`: {reply:?}")))
    };
    let string = |name: &str| get(name).and_then(text);
    let int = |name: &str| {
        let value = get(name)?;
        match value {
            Value::Int(n) => Ok(*n),
            other => text(other)?
                .parse::<i64>()
                .map_err(|_| EdgeError::Reply(format!("BOOK `{name}` is not an integer"))),
        }
    };
    let result = match string("result")?.as_str() {
        "created" => BookingResult::Created,
        "existing" => BookingResult::Existing,
        other => return Err(EdgeError::Reply(format!("BOOK result `{other}`"))),
    };
    Ok(Booking {
        booking_id: string("booking_id")?,
        result,
        gpu_id: string("gpu_id")?,
        user_id: string("user_id")?,
        price: string("price")?,
        duration_s: u64::try_from(int("duration_s")?)
            .map_err(|_| EdgeError::Reply("BOOK `duration_s` is negative".into()))?,
        start_ms: int("start_ms")?,
        end_ms: int("end_ms")?,
        cost: string("cost")?,
        gpu_version: int("gpu_version")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn book_fields(result: &str) -> Vec<(Value, Value)> {
        vec![
            (bulk("booking_id"), bulk("b1")),
            (bulk("result"), bulk(result)),
            (bulk("gpu_id"), bulk("g1")),
            (bulk("user_id"), bulk("alice")),
            (bulk("price"), bulk("2.5")),
            (bulk("duration_s"), Value::Int(3600)),
            (bulk("start_ms"), Value::Int(1_000)),
            (bulk("end_ms"), Value::Int(3_601_000)),
            (bulk("cost"), bulk("2.5")),
            (bulk("gpu_version"), Value::Int(7)),
        ]
    }

    fn expected(result: BookingResult) -> Booking {
        Booking {
            booking_id: "b1".into(),
            result,
            gpu_id: "g1".into(),
            user_id: "alice".into(),
            price: "2.5".into(),
            duration_s: 3600,
            start_ms: 1_000,
            end_ms: 3_601_000,
            cost: "2.5".into(),
            gpu_version: 7,
        }
    }

    #[test]
    fn book_replies_parse_in_resp2_and_resp3() {
        let resp3 = Value::Map(book_fields("created"));
        assert_eq!(
            parse_booking(&resp3).unwrap(),
            expected(BookingResult::Created)
        );
        let resp2 = Value::Array(
            book_fields("existing")
                .into_iter()
                .flat_map(|(k, v)| [k, v])
                .collect(),
        );
        assert_eq!(
            parse_booking(&resp2).unwrap(),
            expected(BookingResult::Existing)
        );
    }

    #[test]
    fn malformed_book_replies_are_reply_errors() {
        let mut missing = book_fields("created");
        missing.retain(|(k, _)| *k != bulk("end_ms"));
        assert!(matches!(
            parse_booking(&Value::Map(missing)),
            Err(EdgeError::Reply(m)) if m.contains("end_ms")
        ));
        assert!(matches!(
            parse_booking(&Value::Map(book_fields("maybe"))),
            Err(EdgeError::Reply(_))
        ));
        assert!(parse_booking(&Value::Okay).is_err());
        let mut negative = book_fields("created");
        negative[5].1 = Value::Int(-1);
        assert!(parse_booking(&Value::Map(negative)).is_err());
    }

    #[test]
    fn versions_parse_and_waitaof_starts_at_7_2() {
        assert_eq!(parse_version("7.0.15"), Some((7, 0, 15)));
        assert_eq!(parse_version("7.2.4"), Some((7, 2, 4)));
        assert_eq!(parse_version("8.0"), Some((8, 0, 0)));
        assert_eq!(parse_version("255.255.255"), Some((255, 255, 255)));
        assert_eq!(parse_version("x.1"), None);
        assert_eq!(parse_version(""), None);
        assert!(!has_waitaof((7, 0, 15)));
        assert!(!has_waitaof((6, 2, 14)));
        assert!(!has_waitaof((7, 1, 242)));
        assert!(has_waitaof((7, 2, 0)));
        assert!(has_waitaof((7, 4, 1)));
        assert!(has_waitaof((8, 0, 0)));
    }

    #[test]
    fn waitaof_replies_parse() {
        let reply = Value::Array(vec![Value::Int(1), Value::Int(2)]);
        assert_eq!(
            parse_waitaof(&reply).unwrap(),
            AofAcks {
                local: true,
                replicas: 2
            }
        );
        let reply = Value::Array(vec![Value::Int(0), Value::Int(-3)]);
        assert_eq!(
            parse_waitaof(&reply).unwrap(),
            AofAcks {
                local: false,
                replicas: 0
            }
        );
        assert!(parse_waitaof(&Value::Int(1)).is_err());
        assert!(parse_waitaof(&Value::Array(vec![Value::Int(1)])).is_err());
    }

    #[test]
    fn durability_is_judged_by_every_requirement() {
        let timeout = Duration::from_millis(100);
        let two = Durability::replicas(2, timeout);
        let acks = |replicas, aof| Acks { replicas, aof };
        assert_eq!(two.shortfall(&acks(2, None)), None);
        assert_eq!(two.shortfall(&acks(3, None)), None);
        assert_eq!(
            two.shortfall(&acks(1, None)),
            Some(Shortfall::Replicas {
                acknowledged: 1,
                required: 2
            })
        );
        assert_eq!(
            Durability::replicas(0, timeout).shortfall(&acks(0, None)),
            None
        );

        let aof = Durability::replicas(1, timeout)
            .with_local_aof()
            .with_aof_replicas(1);
        assert!(aof.needs_aof());
        assert!(!two.needs_aof());
        let fsynced = |local, replicas| Some(AofAcks { local, replicas });
        assert_eq!(aof.shortfall(&acks(1, fsynced(true, 1))), None);
        assert_eq!(
            aof.shortfall(&acks(1, fsynced(false, 1))),
            Some(Shortfall::LocalAof)
        );
        assert_eq!(
            aof.shortfall(&acks(1, fsynced(true, 0))),
            Some(Shortfall::AofReplicas {
                acknowledged: 0,
                required: 1
            })
        );
        assert!(matches!(
            aof.shortfall(&acks(1, None)),
            Some(Shortfall::WaitFailed(_))
        ));
        // The replica count is checked first: WAITAOF is not even sent when WAIT fell short.
        assert!(matches!(
            aof.shortfall(&acks(0, None)),
            Some(Shortfall::Replicas { .. })
        ));
    }

    #[test]
    fn timeouts_are_rounded_up_and_never_zero() {
        assert_eq!(timeout_ms(Instant::now()), 1);
        let past = Instant::now().checked_sub(Duration::from_secs(1));
        if let Some(past) = past {
            assert_eq!(timeout_ms(past), 1);
        }
        let later = timeout_ms(Instant::now() + Duration::from_micros(2_500_100));
        assert!((2_500..=2_501).contains(&later), "{later}");
    }

    #[test]
    fn outcomes_expose_the_booking_and_acks() {
        let booking = expected(BookingResult::Created);
        let acks = Acks {
            replicas: 1,
            aof: None,
        };
        let durable = BookOutcome::Durable {
            booking: booking.clone(),
            acks,
        };
        assert!(durable.is_durable());
        assert_eq!(durable.booking(), &booking);
        let not = BookOutcome::NotDurable {
            booking: booking.clone(),
            acks: Acks::default(),
            reason: Shortfall::LocalAof,
        };
        assert!(!not.is_durable());
        assert_eq!(not.acks().replicas, 0);
        assert_eq!(
            Shortfall::Replicas {
                acknowledged: 0,
                required: 1
            }
            .to_string(),
            "0 of 1 replicas acknowledged"
        );
    }
}
