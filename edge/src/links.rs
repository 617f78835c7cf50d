//! Where an edge's links run: one stream link per group of regions (all regions on one
//! server; one cluster slot each in a cluster), and one notification link per server that
//! holds a followed region — keyspace notifications fire only on the server that owns the key,
//! so in a cluster each region's master is subscribed to, and the subscriptions follow the
//! regions when a failover or a reshard moves them.
//!
//! A topology thread asks discovery again every `LinkConfig::refresh` (and the stream links
//! ask at once when they fail, or read `MOVED`), then starts and stops notification links to
//! match.

use crate::cache::L1;
use crate::error::EdgeError;
use crate::listener::{self, LinkConfig, Scope};
use crate::topology::{Group, Node, Topology};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Starts every link of `regions`; they run until `stop`. If one cannot start, those already
/// started are stopped.
pub(crate) fn start(
    topology: Arc<Topology>,
    regions: &[String],
    l1: Arc<L1>,
    link: LinkConfig,
    stop: Arc<AtomicBool>,
) -> Result<Vec<JoinHandle<()>>, EdgeError> {
    let mut threads = Vec::new();
    let started = start_into(&mut threads, topology, regions, l1, link, stop.clone());
    if started.is_err() {
        stop.store(true, Ordering::Release);
        for thread in threads.drain(..) {
            let _ = thread.join();
        }
    }
    started.map(|()| threads)
}

fn start_into(
    threads: &mut Vec<JoinHandle<()>>,
    topology: Arc<Topology>,
    regions: &[String],
    l1: Arc<L1>,
    link: LinkConfig,
    stop: Arc<AtomicBool>,
) -> Result<(), EdgeError> {
    l1.follow_regions(regions);
    let groups = topology.groups(regions);
    for (group, members) in &groups {
        let (topology, group, members, l1, link, stop) = (
            topology.clone(),
            *group,
            members.clone(),
            l1.clone(),
            link.clone(),
            stop.clone(),
        );
        threads.push(spawn("gpucache-edge-stream", move || {
            let stopped = || stop.load(Ordering::Acquire);
            let scope = Scope {
                topology: &topology,
                regions: &members,
                l1: &l1,
                config: &link,
                stopped: &stopped,
            };
            listener::run_stream(&scope, group)
        })?);
    }
    if link.notifications || topology.discovers() {
        let groups: Vec<Group> = groups.iter().map(|(g, _)| *g).collect();
        let regions = regions.to_vec();
        threads.push(spawn("gpucache-edge-topology", move || {
            supervise(&topology, &groups, &regions, &l1, &link, &stop)
        })?);
    }
    Ok(())
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, EdgeError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map_err(|e| EdgeError::Connection(e.to_string()))
}

/// A running notification link.
struct Notifier {
    stop: Arc<AtomicBool>,
    up: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The notification links' states, summed up in `Stats::connection`: up when every wanted
/// server's link is up.
#[derive(Default)]
struct NotifierStates(Mutex<Vec<Arc<AtomicBool>>>);

impl NotifierStates {
    fn set(&self, states: Vec<Arc<AtomicBool>>, l1: &L1) {
        if let Ok(mut current) = self.0.lock() {
            *current = states;
            publish(&current, l1);
        }
    }

    fn changed(&self, l1: &L1) {
        if let Ok(current) = self.0.lock() {
            publish(&current, l1);
        }
    }
}

fn publish(states: &[Arc<AtomicBool>], l1: &L1) {
    let up = !states.is_empty() && states.iter().all(|s| s.load(Ordering::Acquire));
    l1.counters.notifications_up.store(up, Ordering::Release);
}

/// The topology thread: re-discovers now and then, and keeps one notification link on each
/// server that holds a followed region.
fn supervise(
    topology: &Arc<Topology>,
    groups: &[Group],
    regions: &[String],
    l1: &Arc<L1>,
    link: &LinkConfig,
    stop: &Arc<AtomicBool>,
) {
    let states = Arc::new(NotifierStates::default());
    let mut notifiers: HashMap<String, Notifier> = HashMap::new();
    let mut retired: Vec<JoinHandle<()>> = Vec::new();
    let mut placed_for: Option<u64> = None;
    let mut next_refresh = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if topology.discovers() && Instant::now() >= next_refresh {
            let _ = topology.refresh();
            next_refresh = Instant::now() + link.refresh;
        }
        let generation = topology.generation();
        if link.notifications && placed_for != Some(generation) {
            placed_for = Some(generation);
            let wanted = topology.nodes_for(groups);
            let unwanted: Vec<String> = notifiers
                .keys()
                .filter(|name| !wanted.iter().any(|n| n.name == **name))
                .cloned()
                .collect();
            for name in unwanted {
                if let Some(notifier) = notifiers.remove(&name) {
                    notifier.stop.store(true, Ordering::Release);
                    retired.push(notifier.thread);
                }
            }
            for node in wanted {
                if notifiers.contains_key(&node.name) {
                    continue;
                }
                let name = node.name.clone();
                if let Ok(notifier) = notify(topology, node, regions, l1, link, stop, &states) {
                    notifiers.insert(name, notifier);
                }
            }
            states.set(notifiers.values().map(|n| n.up.clone()).collect(), l1);
        }
        let ended = take_finished(&mut notifiers);
        if !ended.is_empty() {
            placed_for = None; // start them again
            retired.extend(ended);
        }
        // Stopped links end within a poll; join them as they do.
        let (done, running): (Vec<_>, Vec<_>) = retired.drain(..).partition(|t| t.is_finished());
        retired = running;
        for thread in done {
            let _ = thread.join();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for notifier in notifiers.into_values() {
        let _ = notifier.thread.join();
    }
    for thread in retired {
        let _ = thread.join();
    }
}

/// The notifiers whose thread ended although not told to stop (a panic outside a session).
fn take_finished(notifiers: &mut HashMap<String, Notifier>) -> Vec<JoinHandle<()>> {
    let done: Vec<String> = notifiers
        .iter()
        .filter(|(_, n)| n.thread.is_finished())
        .map(|(name, _)| name.clone())
        .collect();
    done.into_iter()
        .filter_map(|name| notifiers.remove(&name).map(|n| n.thread))
        .collect()
}

fn notify(
    topology: &Arc<Topology>,
    node: Node,
    regions: &[String],
    l1: &Arc<L1>,
    link: &LinkConfig,
    stop: &Arc<AtomicBool>,
    states: &Arc<NotifierStates>,
) -> Result<Notifier, EdgeError> {
    let own_stop = Arc::new(AtomicBool::new(false));
    let up = Arc::new(AtomicBool::new(false));
    let thread = {
        let (topology, regions, l1, link, stop, own_stop, up, states) = (
            topology.clone(),
            regions.to_vec(),
            l1.clone(),
            link.clone(),
            stop.clone(),
            own_stop.clone(),
            up.clone(),
            states.clone(),
        );
        spawn("gpucache-edge-notify", move || {
            let stopped = || stop.load(Ordering::Acquire) || own_stop.load(Ordering::Acquire);
            let changed = || states.changed(&l1);
            let scope = Scope {
                topology: &topology,
                regions: &regions,
                l1: &l1,
                config: &link,
                stopped: &stopped,
            };
            listener::run_notifications(&scope, node, &up, &changed);
        })?
    };
    Ok(Notifier {
        stop: own_stop,
        up,
        thread,
    })
}
