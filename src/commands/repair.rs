//! `GPUCACHE.REPAIR region` — repairs what records that vanished without an expiry event left
//! behind (see `heal::sweep_region`). Runs by itself after every RDB/AOF load; operators may run
//! it when `GPUCACHE.CHECK` reports records that are gone.

use super::{Args, Out, Reply};
use crate::core::error::MarketResult;
use crate::heal;
use crate::store::Store;
use redis_module::RedisString;

pub fn command(store: &Store, all: &[RedisString]) -> MarketResult<Out> {
    let mut args = Args::new(all, 1, 1)?;
    let region = args.region()?;
    let swept = heal::sweep_region(store.ctx(), &region)?;
    Ok(Reply::new()
        .text("region", region)
        .int("gpus", swept.gpus)
        .int("bookings", swept.bookings)
        .int("type_prices", swept.type_prices)
        .int("provider_members", swept.provider_members)
        .build())
}
