//! The README's contract, checked against the server: the points an outside differential test
//! found where the two disagreed (INVALIDATE targets, repeated options, SORT SCORE ties, STATUS
//! busy, reply field order).

mod common;

use common::*;
use redis::Value;
use serde_json::Value as Json;

const README: &str = include_str!("../README.md");

/// The README section that starts with the heading `heading` (up to the next heading of the same
/// or a higher level).
fn readme_section(heading: &str) -> &'static str {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let start = README
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no section {heading}"))
        + 1;
    let body = &README[start + heading.len()..];
    let end = body
        .match_indices("\n#")
        .find(|(i, _)| {
            let hashes = body[i + 1..].chars().take_while(|c| *c == '#').count();
            hashes <= level && body[i + 1 + hashes..].starts_with(' ')
        })
        .map_or(body.len(), |(i, _)| i);
    &body[..end]
}

/// The keys named by the last `manual_invalidation` event of region `eu`.
fn last_invalidated(con: &mut redis::Connection) -> Vec<String> {
    let reply = run(
        con,
        &["XREVRANGE", "gpucache:{eu}:events", "+", "-", "COUNT", "1"],
    )
    .unwrap();
    let Value::Array(entries) = reply else {
        panic!("no events: {reply:?}")
    };
    let Some(Value::Array(entry)) = entries.first() else {
        panic!("no events")
    };
    let fields = as_map(&entry[1]);
    assert_eq!(text(&fields["type"]), "manual_invalidation");
    let payload: Json = serde_json::from_str(&text(&fields["payload"])).unwrap();
    payload["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect()
}

fn invalidate(con: &mut redis::Connection, targets: &[&str]) -> redis::RedisResult<Value> {
    let mut args = vec!["GPUCACHE.INVALIDATE", "eu"];
    args.extend_from_slice(targets);
    run(con, &args)
}

/// Every key family of the README's "Keys" table, for region `eu`, with `<...>` ids filled in.
fn readme_keys() -> Vec<String> {
    let keys: Vec<String> = readme_section("## Keys")
        .lines()
        .filter_map(|line| line.strip_prefix("| `gpucache:{R}:"))
        .map(|rest| {
            let pattern = &rest[..rest.find('`').expect("closing backtick")];
            let mut key = format!("gpucache:{{eu}}:{pattern}");
            for (placeholder, id) in [
                ("<gpu_id>", "g1"),
                ("<booking_id>", "b1"),
                ("<provider_id>", "p1"),
                ("<type>", "A100"),
            ] {
                key = key.replace(placeholder, id);
            }
            assert!(!key.contains('<'), "unknown placeholder in {key}");
            key
        })
        .collect();
    assert!(keys.len() >= 15, "README Keys table not found: {keys:?}");
    keys
}

#[test]
fn invalidate_accepts_every_key_family_of_the_readme_as_a_full_key_of_its_region_only() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "60"],
    )
    .unwrap();
    let mut keys = readme_keys();
    // The order-book channel key is notified like a key, so it can be invalidated like one.
    keys.push("gpucache:{eu}:orderbook:A100".into());
    for key in &keys {
        let count = invalidate(&mut con, &[key]).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(count, Value::Int(1), "{key}");
        assert_eq!(
            last_invalidated(&mut con),
            std::slice::from_ref(key),
            "{key}"
        );
    }
    // All at once, each named once.
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let count = invalidate(&mut con, &refs).unwrap();
    assert_eq!(count, Value::Int(keys.len() as i64));
    assert_eq!(last_invalidated(&mut con), keys);
    assert_foreign_keys_refused(&mut con);
    assert_consistent(&mut con, "eu");
}

#[test]
fn invalidate_takes_score_index_and_order_book_shorthands() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    assert_eq!(
        invalidate(&mut con, &["avail-score:A100", "orderbook:H100"]).unwrap(),
        Value::Int(2)
    );
    assert_eq!(
        last_invalidated(&mut con),
        [
            "gpucache:{eu}:avail-score:A100",
            "gpucache:{eu}:orderbook:H100"
        ]
    );
    // A shorthand and its full key name the same key once.
    assert_eq!(
        invalidate(
            &mut con,
            &["orderbook:A100", "gpucache:{eu}:orderbook:A100"]
        )
        .unwrap(),
        Value::Int(1)
    );
}

/// Keys of another region, of no family, or with a bad id are refused, and change nothing.
fn assert_foreign_keys_refused(con: &mut redis::Connection) {
    let before = snapshot(con);
    for target in [
        "gpucache:{us}:stats:market",
        "gpucache:{us}:avail-score:A100",
        "gpucache:{us}:orderbook:A100",
        "gpucache:{us}:gpu:g1",
        "gpucache:{us}:events",
        "gpucache:{eu}:stats:bogus",
        "gpucache:{eu}:index:bogus",
        "gpucache:{eu}:events:x",
        "gpucache:{eu}:bogus:x",
        "gpucache:{eu}:orderbook:",
        "gpucache:{eu}:avail-score:bad id",
        "bogus:x",
        "orderbook:",
    ] {
        let err = error(con, &["GPUCACHE.INVALIDATE", "eu", "stats", target]);
        assert!(err.starts_with("ERR"), "{target}: {err}");
    }
    let err = error(
        con,
        &["GPUCACHE.INVALIDATE", "eu", "gpucache:{us}:stats:24h"],
    );
    assert!(err.contains("another region"), "{err}");
    assert_same_state(&snapshot(con), &before, "after refused invalidations");
}

#[test]
fn the_available_and_region_targets_include_the_score_indexes() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let mut expected = Vec::new();
    for gpu_type in ["A100", "H100"] {
        for index in ["avail-own", "avail-type", "avail-draining", "avail-score"] {
            expected.push(format!("gpucache:{{eu}}:{index}:{gpu_type}"));
        }
    }
    expected.sort();

    assert_eq!(invalidate(&mut con, &["available"]).unwrap(), Value::Int(8));
    let mut named = last_invalidated(&mut con);
    named.sort();
    assert_eq!(named, expected);

    assert_eq!(invalidate(&mut con, &["region"]).unwrap(), Value::Int(9));
    let mut named = last_invalidated(&mut con);
    named.sort();
    let mut with_stats = expected.clone();
    with_stats.push("gpucache:{eu}:stats:market".into());
    with_stats.sort();
    assert_eq!(named, with_stats);

    // The README says so.
    let section = readme_section("### GPUCACHE.INVALIDATE");
    assert!(section.contains("avail-score:A100"), "{section}");
    assert!(section.contains("avail-draining:A100"), "{section}");
}

#[test]
fn repeated_options_are_refused() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    let before = snapshot(&mut con);
    let available: [(&str, &str, &str); 6] = [
        ("TYPE", "A100", "H100"),
        ("MAXPRICE", "5", "3"),
        ("MINMEMORY", "0", "1"),
        ("MINCORES", "0", "1"),
        ("SORT", "PRICE", "SCORE"),
        ("LIMIT", "5", "1"),
    ];
    for (option, first, second) in available {
        let lower = option.to_lowercase();
        for (a, b) in [
            (option, option),
            (lower.as_str(), option),
            (option, lower.as_str()),
        ] {
            let args = ["GPUCACHE.AVAILABLE", "eu", a, first, b, second];
            let err = error(&mut con, &args);
            assert_eq!(err, format!("ERR option {option} given twice"), "{args:?}");
            // Another option in between changes nothing.
            let other = if option == "LIMIT" { "SORT" } else { "LIMIT" };
            let value = if option == "LIMIT" { "PRICE" } else { "3" };
            let args = [
                "GPUCACHE.AVAILABLE",
                "eu",
                a,
                first,
                other,
                value,
                b,
                second,
            ];
            let err = error(&mut con, &args);
            assert_eq!(err, format!("ERR option {option} given twice"), "{args:?}");
        }
    }
    // Every option once is still fine.
    available_ids(
        &mut con,
        &[
            "eu",
            "TYPE",
            "A100",
            "MAXPRICE",
            "5",
            "MINMEMORY",
            "0",
            "MINCORES",
            "0",
            "SORT",
            "PRICE",
            "LIMIT",
            "5",
        ],
    );
    for (a, b) in [("DEPTH", "DEPTH"), ("depth", "Depth")] {
        let args = ["GPUCACHE.ORDERBOOK", "eu", "A100", a, "2", b, "3"];
        assert_eq!(
            error(&mut con, &args),
            "ERR option DEPTH given twice",
            "{args:?}"
        );
    }
    run(
        &mut con,
        &["GPUCACHE.ORDERBOOK", "eu", "A100", "DEPTH", "2"],
    )
    .unwrap();
    assert_same_state(&snapshot(&mut con), &before, "after refused reads");
}

fn register_scored(con: &mut redis::Connection, gpu_id: &str, gpu_type: &str, score: Option<&str>) {
    let mut args = vec![
        "GPUCACHE.REGISTER",
        "eu",
        gpu_id,
        "PROVIDER",
        "p1",
        "TYPE",
        gpu_type,
        "PRICE",
        "1",
    ];
    if let Some(score) = score {
        args.extend(["SCORE", score]);
    }
    run(con, &args).unwrap();
}

#[test]
fn sort_score_breaks_ties_by_ascending_gpu_id_within_and_across_types() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    for (gpu_id, gpu_type, score) in [
        ("c1", "A100", Some("7")),
        ("a1", "A100", Some("7")),
        ("b1", "A100", Some("7")),
        ("b2", "H100", Some("7")),
        ("z9", "H100", Some("9")),
        ("d1", "A100", None),
        ("a9", "H100", None),
        ("m5", "A100", Some("7.5")),
        ("m4", "A100", Some("0")),
    ] {
        register_scored(&mut con, gpu_id, gpu_type, score);
    }
    let expected = ["z9", "m5", "a1", "b1", "b2", "c1", "a9", "d1", "m4"];
    assert_eq!(available_ids(&mut con, &["eu", "SORT", "SCORE"]), expected);
    for limit in 1..=expected.len() {
        let limit_text = limit.to_string();
        assert_eq!(
            available_ids(&mut con, &["eu", "SORT", "SCORE", "LIMIT", &limit_text]),
            expected[..limit],
            "LIMIT {limit}"
        );
    }
    assert_eq!(
        available_ids(&mut con, &["eu", "TYPE", "A100", "SORT", "SCORE"]),
        ["m5", "a1", "b1", "c1", "d1", "m4"]
    );
    // SORT PRICE (all at price 1) orders the same ties the same way.
    let mut by_id = expected.to_vec();
    by_id.sort();
    assert_eq!(available_ids(&mut con, &["eu"]), by_id);
}

#[test]
fn sort_score_orders_a_large_tie_by_ascending_gpu_id() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    // More GPUs at one score than any look-ahead buffer, in two types, around a better and a
    // worse GPU, registered in scrambled order.
    let mut ids: Vec<String> = (0..150)
        .map(|i| format!("g{:03}", (i * 37) % 150))
        .collect();
    for (n, id) in ids.iter().enumerate() {
        let gpu_type = if n % 3 == 0 { "H100" } else { "A100" };
        register_scored(&mut con, id, gpu_type, Some("5"));
    }
    register_scored(&mut con, "zz-best", "A100", Some("6"));
    register_scored(&mut con, "aa-worst", "A100", Some("4"));
    ids.sort();
    let mut expected = vec!["zz-best".to_owned()];
    expected.extend(ids.iter().cloned());
    expected.push("aa-worst".into());
    assert_eq!(
        available_ids(&mut con, &["eu", "SORT", "SCORE", "LIMIT", "1000"]),
        expected
    );
    assert_eq!(
        available_ids(&mut con, &["eu", "SORT", "SCORE", "LIMIT", "40"]),
        expected[..40]
    );
    let a100: Vec<String> = available_ids(
        &mut con,
        &["eu", "TYPE", "A100", "SORT", "SCORE", "LIMIT", "1000"],
    );
    let mut sorted = a100[1..a100.len() - 1].to_vec();
    sorted.sort();
    assert_eq!(a100[1..a100.len() - 1], sorted[..]);
    assert_eq!(a100.first().map(String::as_str), Some("zz-best"));
    assert_eq!(a100.last().map(String::as_str), Some("aa-worst"));

    // Crowded ties at the ends of the score range (entries written by hand, without records,
    // which the search skips): the walk ends instead of starting that score over.
    for score in ["+inf", "-inf"] {
        let mut args = vec![
            "ZADD".to_owned(),
            "gpucache:{eu}:avail-score:A100".to_owned(),
        ];
        for i in 0..40 {
            args.extend([score.to_owned(), format!("ghost{score}{i:02}")]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&mut con, &refs).unwrap();
    }
    assert_eq!(
        available_ids(&mut con, &["eu", "SORT", "SCORE", "LIMIT", "1000"]),
        expected
    );
}

#[test]
fn setting_busy_by_hand_is_refused_even_on_a_busy_gpu() {
    let server = Server::start(&[], &[]);
    let mut con = server.connect();
    seed(&mut con);
    run(
        &mut con,
        &["GPUCACHE.BOOK", "eu", "g1", "b1", "alice", "600"],
    )
    .unwrap();
    let before = snapshot(&mut con);
    for status in ["busy", "BUSY"] {
        let err = error(&mut con, &["GPUCACHE.STATUS", "eu", "g1", status]);
        assert!(err.starts_with("BADSTATE"), "{err}");
        let err = error(&mut con, &["GPUCACHE.STATUS", "eu", "g2", status]);
        assert!(err.starts_with("BADSTATE"), "{err}");
    }
    assert_same_state(&snapshot(&mut con), &before, "after STATUS busy");
    // The current status again is still a no-op for the others.
    run(&mut con, &["GPUCACHE.STATUS", "eu", "g2", "offline"]).unwrap();
    for status in ["available", "offline", "maintenance"] {
        run(&mut con, &["GPUCACHE.STATUS", "eu", "g2", status]).unwrap();
        let before = snapshot(&mut con);
        let again = fields(&mut con, &["GPUCACHE.STATUS", "eu", "g2", status]);
        assert_eq!(again["result"], "unchanged", "{status}");
        assert_same_state(&snapshot(&mut con), &before, status);
    }
    let section = readme_section("### GPUCACHE.STATUS — the GPU state machine");
    assert!(
        section.contains("even on a GPU that is already `busy`"),
        "{section}"
    );
}

/// The field names of a reply map (RESP2 flat array or RESP3 map), in reply order.
fn field_names(reply: &Value) -> Vec<String> {
    match reply {
        Value::Map(pairs) => pairs.iter().map(|(k, _)| text(k)).collect(),
        Value::Array(items) => items.chunks(2).map(|pair| text(&pair[0])).collect(),
        other => panic!("not a map: {other:?}"),
    }
}

fn assert_name_order(reply: &Value, what: &str) {
    let names = field_names(reply);
    let mut sorted = names.clone();
    sorted.sort();
    assert!(!names.is_empty(), "{what}: no fields");
    assert_eq!(names, sorted, "{what}: fields not in name order");
}

#[test]
fn reply_fields_come_in_name_order() {
    let server = Server::start(&[], &[]);
    for mut con in [server.connect(), server.connect_resp3()] {
        run(&mut con, &["FLUSHALL"]).unwrap();
        let register = run(
            &mut con,
            &[
                "GPUCACHE.REGISTER",
                "eu",
                "g1",
                "PROVIDER",
                "p1",
                "TYPE",
                "A100",
                "PRICE",
                "2",
                "MEMORY",
                "80",
                "CORES",
                "6912",
                "SCORE",
                "3",
            ],
        )
        .unwrap();
        assert_name_order(&register, "REGISTER");
        seed(&mut con);
        for args in [
            &["GPUCACHE.GET", "eu", "g1"][..],
            &["GPUCACHE.STATUS", "eu", "g2", "offline"],
            &["GPUCACHE.PRICE", "eu", "A100", "3"],
            &["GPUCACHE.BOOK", "eu", "g3", "b1", "alice", "600"],
            &["GPUCACHE.GET", "eu", "g3"],
            &["GPUCACHE.CANCEL", "eu", "b1"],
            &["GPUCACHE.PROVIDER", "eu", "p2", "online"],
            &["GPUCACHE.ORDERBOOK", "eu", "A100"],
            &["GPUCACHE.STATS", "eu"],
            &["GPUCACHE.STATS"],
            &["GPUCACHE.CHECK", "eu"],
            &["GPUCACHE.REPAIR", "eu"],
        ] {
            let reply = run(&mut con, args).unwrap();
            assert_name_order(&reply, &args.join(" "));
        }
        let Value::Array(rows) = run(&mut con, &["GPUCACHE.AVAILABLE", "eu"]).unwrap() else {
            panic!("AVAILABLE")
        };
        assert!(!rows.is_empty());
        for row in &rows {
            assert_name_order(row, "AVAILABLE row");
        }
        let book = as_map(&run(&mut con, &["GPUCACHE.ORDERBOOK", "eu", "A100"]).unwrap());
        let Value::Array(asks) = &book["asks"] else {
            panic!("asks")
        };
        for ask in asks {
            assert_name_order(ask, "ORDERBOOK ask");
        }
    }
    // The README says which order that is, and that clients read fields by name.
    let intro = readme_section("## Commands");
    assert!(intro.contains("byte order of their names"), "{intro}");
    assert!(intro.contains("by name"), "{intro}");
}
