//! The deterministic simulator: agents, relays and a consumer group running the nodes the
//! daemons run: each agent's sending decisions (`agent::sender::Sender`, the forwarder's node),
//! the relay's decisions (`relay::node::RelayNode`), and the consumer's own pipeline
//! (`consumer::pipeline::Pipeline`: ordering, echoes, routing, restores at the origin, the
//! relock after a password change, retry queues and what waits behind them, account owners,
//! dead letters), over its real `State` in a redb database kept in memory (a crash drops what
//! was not flushed: `State::crashed`), on the simulated clock, opening the simulator's plain
//! envelopes through the pipeline's `Open` seam. Its targets are built by `targets::build` from
//! real sections (routing, limits) with an in-memory system behind the real `Target` trait,
//! behaving as their declared limits say (a new password lifts a revoke's lock where it does).
//! Each seed runs twice:
//! - **embedded**: one relay over the embedded journal's in-memory twin
//!   (`relay::journal::MemoryJournal`, the same apply and prune rules as the redb file);
//! - **shared**: two relays appending to one shared journal, the JetStream cluster's in-memory
//!   twin (`relay::journal::MemoryStream`: whole-stream expectations, message ids,
//!   compare-and-set registers), each through the JetStream journal's own append node
//!   (`relay::journal::chain::ChainAppend`) one read or publish per step, so the relays'
//!   chains interleave; the cluster loses publishes, loses answers of stored ones and fails
//!   reads and register writes; agents move to the other relay when acks stop (the sender's
//!   `NextRelay`), the consumer when its relay is down or cut off; relays prune as the
//!   JetStream journal does (registers first).
//!
//! All over in-memory stores with crash
//! semantics, a network that drops, duplicates, delays and reorders, partitions, crashes and
//! restarts of any node at any step, clocks that run ahead
//! (one host by 400 days), and targets that fail. Everything is driven by one seeded generator,
//! so a seed replays exactly (name the test for one mode):
//!
//! ```text
//! PWSYNC_SIM_SEED=1234 cargo test -p pwsync-tests --test sim -- --nocapture
//! ```
//! (`PWSYNC_SIM_SEEDS=N` runs N seeds from `PWSYNC_SIM_FIRST`, default 10,000 from 0.)
//!
//! What is checked, at every step and at the end:
//! - **custody (G1)**: an agent deletes a spooled change only when the relay's journal holds it
//!   durably; the relay prunes a record only when the group's durable cursor is past it;
//! - **no loss, once (G1, G2)**: every change an agent accepted is journaled exactly once (at
//!   each landing: offsets go up by one, and an agent's seqs without a gap or a repeat), a
//!   shared register never goes down, and after the faults stop everything drains: spools
//!   empty, journal committed, retries done;
//! - **order (G3)**: per user, every target ends where an oracle written apart from the
//!   consumer puts it by the ordering rule (capture time = the smaller of the agent's HLC and
//!   the relay's journal time; account ops: newer or equal wins, remove is final, a revoked
//!   account stays locked through password changes; value ops — replace, add, delete — folded
//!   in capture order, then journal order), and on the way there, within one life of the
//!   consumer, each target gets a user's account ops in capture order (a crash's replay may
//!   repeat an older one; a remove is final whenever captured) and no value op under a newer
//!   replace (an add or delete arriving late lands before the later ones are applied again);
//! - **nothing lost at a target**: targets fail for a while (busy) and now and then refuse a
//!   change for good; once the faults stop an operator retries the dead
//!   letters and drops those the consumer refuses as older, and nothing may be left but changes
//!   refused because another source user holds their account; no change that waited in a
//!   retry queue is judged older than its target's newer change when its turn comes (the
//!   queue keeps each user's order there; one a newer replace superseded meanwhile just
//!   leaves it);
//! - **owners**: sys-a's `map` gives erin dave's account; within one life of the consumer an
//!   account is written for one source user only;
//! - **backfills** (a password seen at a login on host-0 or host-1) fill only a user with no op
//!   yet, only where pwsync has not written for them, and never hold back a real change;
//! - **nothing invented (G6)**: every apply at a target is of a change an agent made (each
//!   names its envelope in a `sim.id` attribute), or the pipeline's own relock after one; a
//!   change reaches the system it was made on only when pwsync wrote an older change there
//!   after it (`decide::restore_at_origin`) or, an add or delete, to be applied again after an
//!   earlier one that arrived late; sys-b, whose own agent is host-2, must end where every
//!   other system does. (Those two are held by the end state, not checked at each apply.)

use pwsync_agent::sender::{AfterAck, AfterTimeout, Sender, Timing};
use pwsync_consumer::config::ConsumerConfig;
use pwsync_consumer::decide;
use pwsync_consumer::pipeline::{Pipeline, Taken};
use pwsync_consumer::state::State;
use pwsync_consumer::targets::{self, Configured, Limits, Outcome, Unusable};
use pwsync_consumer::unseal::{Open, OpenResult, Opened, Unsealed, UnsealedRecord};
use pwsync_proto::change::BACKFILL_ATTRIBUTE;
use pwsync_proto::hlc::{Hlc, HybridClock};
use pwsync_proto::{AgentId, Change, GroupName, Offset, Op, Secret, Seq};
use pwsync_relay::journal::chain::{self, Answer, Budget, ChainAppend, Link, Register, RoundEnd};
use pwsync_relay::journal::rules::prune_floor;
use pwsync_relay::journal::{Applied, Incoming, Intake, MemoryJournal, MemoryStream};
use pwsync_relay::node::{CommitKind, RelayNode};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

// ---- randomness -----------------------------------------------------------------------------

/// SplitMix64: small, fast, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability `per_mille / 1000`.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

// ---- the pieces -------------------------------------------------------------------------------

/// erin has an account of her own on sys-b; sys-a's `map` gives her dave's (a mistake the
/// consumer's owner rule guards against: the first of them applied there holds it).
const USERS: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];
/// The attribute naming the envelope (agent and seq) a change came in, so a model target knows
/// which change it is applying (a replayed add or delete, or the change being handled).
const SIM_ID: &str = "sim.id";
const DAY_MS: u64 = 86_400_000;
/// Where the simulated wall clock starts (a real epoch time, so HLCs look like real ones).
const EPOCH_MS: u64 = 1_800_000_000_000;
const AGENT_ACK_TIMEOUT_MS: u64 = 200;
const FAST_RESEND_MS: u64 = 50;
const RELAY_REDELIVERY_MS: u64 = 300;
const AGENT_WINDOW: u16 = 8;
const GROUP_WINDOW: u64 = 6;
const RETRY_BASE_MS: u64 = 20;

/// One envelope as it travels (the simulator needs no encryption: the core never sees it).
#[derive(Clone, Debug)]
struct Envelope {
    agent: usize,
    seq: u64,
    hlc: Hlc,
    change: Change,
}

#[derive(Clone, Debug)]
enum Message {
    Up(Vec<Envelope>),
    Ack {
        agent: usize,
        through: u64,
    },
    Delivery {
        first: u64,
        records: Vec<(u64, Envelope)>,
    },
    Commit(u64),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Node {
    Agent(usize),
    Relay(usize),
    Consumer,
}

/// The journal the relays run on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// One relay with the embedded journal's in-memory twin.
    Embedded,
    /// Two relays appending to one shared journal (JetStream's in-memory twin), each through
    /// the JetStream journal's own append node, with agents and the consumer failing over
    /// between them.
    Shared,
}

struct Agent {
    /// The system its host is: its changes are made there (and never applied back there).
    origin: String,
    /// Set directly on that system's store when the change is made, if the system is a target.
    origin_target: Option<usize>,
    skew_ms: u64,
    // durable
    spool: BTreeMap<u64, Envelope>,
    next_seq: u64,
    clock: HybridClock,
    // volatile
    /// The agent's own sending decisions (the forwarder's node).
    sender: Sender,
    /// The relay it sends to now.
    relay: usize,
}

/// A record as journaled, kept by the simulator for the oracle (the journal prunes its own).
struct JournalRecord {
    journaled_ms: u64,
    envelope: Envelope,
}

/// A relay: the daemon's own decisions ([`RelayNode`]), over the embedded journal's in-memory
/// twin, which takes each batch by the same rules ([`MemoryJournal`]), or over the shared
/// journal's twin ([`MemoryStream`], in [`Sim`]) through the JetStream journal's append node
/// ([`ChainAppend`]), one step of it at a time.
struct Relay {
    // durable (embedded mode)
    journal: MemoryJournal,
    // volatile
    node: RelayNode,
    /// Shared mode: envelopes received while an append is under way (the next batch).
    waiting: Vec<Envelope>,
    appending: Option<Appending>,
}

/// One append to the shared journal under way at a relay.
struct Appending {
    chain: ChainAppend,
    envelopes: Vec<Envelope>,
    phase: Phase,
}

enum Phase {
    /// The round's reads, at this time.
    Read(u64),
    /// Publishing the chain, one link per step; the answers so far.
    Publish {
        links: Vec<Link>,
        answers: Vec<Answer>,
    },
    /// Raising the registers, then the acks, at this time (the cluster's answers to the
    /// chain come back before the writes go out).
    Raise(u64),
}

/// The shared journal's append budget in the simulation (the daemon's, scaled to its times).
const SHARED_BUDGET: Budget = Budget {
    contended_rounds: 16,
    total_ms: 600,
    pause_ms: 30,
};

/// The one consumer group.
fn group() -> GroupName {
    GroupName::new("sim").expect("group name")
}

/// An agent's sender as the forwarder makes it at start, connected at once (the simulation
/// loses messages rather than connections).
fn agent_sender(acked: Seq, relays: usize, now: u64) -> Sender {
    let timing = Timing {
        ack_timeout_ms: AGENT_ACK_TIMEOUT_MS,
        fast_resend_ms: FAST_RESEND_MS,
    };
    let mut sender = Sender::new(acked, AGENT_WINDOW, timing, relays, now);
    sender.on_connected(now);
    sender
}

fn agent_id(i: usize) -> AgentId {
    AgentId::new(agent_name(i)).expect("agent id")
}

fn agent_index(id: &AgentId) -> usize {
    id.as_str()
        .strip_prefix("host-")
        .and_then(|n| n.parse().ok())
        .expect("a simulated agent")
}

/// What the relay journals and delivers for an envelope: opaque bytes naming it (the real
/// relay never looks inside either), looked up again by the consumer.
fn envelope_bytes(e: &Envelope) -> Vec<u8> {
    [(e.agent as u64).to_le_bytes(), e.seq.to_le_bytes()].concat()
}

/// A relay's node as the relay makes it at start, its group delivered from `committed`.
fn relay_node(committed: Offset, now: u64) -> RelayNode {
    let mut node = RelayNode::new();
    node.declare(
        group(),
        committed,
        GROUP_WINDOW as u16,
        RELAY_REDELIVERY_MS,
        now,
    );
    node
}

/// One user's account on a target system.
#[derive(Clone, Default, PartialEq, Eq)]
struct Account {
    values: BTreeSet<Vec<u8>>,
    locked: bool,
    removed: bool,
}

/// The simulator's values are its own text (`pw-N`), printed as such.
impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let values: Vec<_> = self
            .values
            .iter()
            .map(|v| String::from_utf8_lossy(v))
            .collect();
        f.debug_struct("Account")
            .field("values", &values)
            .field("locked", &self.locked)
            .field("removed", &self.removed)
            .finish()
    }
}

struct Target {
    system: String,
    /// Its real kind, which the consumer builds it as.
    kind: &'static str,
    /// Whether a new password lifts a revoke's lock here, as the real target kind declares it
    /// (`Limits::new_password_unlocks`): sys-a is an htpasswd file (it does), sys-b a
    /// PostgreSQL role (it does not).
    new_password_unlocks: bool,
    /// Users the oracle keeps off it (as its `exclude` says, written apart).
    not_here: &'static [&'static str],
    /// Its `map`: user → account.
    map: &'static [(&'static str, &'static str)],
    accounts: BTreeMap<String, Account>,
}

/// A folder for the sections the simulated targets are built from (a PostgreSQL target reads
/// its login's password file when built), made once per test process.
fn target_files() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let pw = dir.path().join("pg.pw");
        std::fs::write(&pw, "not used\n").expect("password file");
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("mode 0600");
        dir
    })
    .path()
}

/// A target of the real kind `kind` (built from a `[targets.NAME]` section by the consumer's
/// own `targets::build`, never connected), modelled in memory by what the kind declares.
fn target(
    system: &str,
    kind: &'static str,
    exclude: &'static [&'static str],
    map: &'static [(&'static str, &'static str)],
) -> Target {
    let built = configured(system, kind, exclude, map);
    Target {
        system: system.into(),
        kind,
        new_password_unlocks: built.limits.new_password_unlocks,
        not_here: exclude,
        map,
        accounts: BTreeMap::new(),
    }
}

impl Target {
    /// The account `user` has here.
    fn account_of<'a>(&self, user: &'a str) -> &'a str {
        self.map
            .iter()
            .find(|(u, _)| *u == user)
            .map_or(user, |(_, a)| a)
    }

    /// Whether two users have `account` here (by the `map`).
    fn shared(&self, account: &str) -> bool {
        self.map.iter().any(|(_, a)| *a == account)
    }
}

/// The consumer's target `system` of kind `kind`, as `targets::build` makes it from a real
/// section (its routing and limits), never connected.
fn configured(system: &str, kind: &str, exclude: &[&str], map: &[(&str, &str)]) -> Configured {
    let own = match kind {
        "htpasswd" => "path = \"sim.htpasswd\"\n",
        "postgres" => {
            "connect = \"host=127.0.0.1 user=pwsync\"\npassword_file = \"pg.pw\"\nmode = \"role\"\n"
        }
        other => panic!("no simulated section for {other}"),
    };
    let map: Vec<String> = map.iter().map(|(u, a)| format!("{u} = {a:?}")).collect();
    let section = format!(
        "type = {kind:?}\nsystem = {system:?}\nexclude = {exclude:?}\nmap = {{ {} }}\n{own}",
        map.join(", ")
    );
    let section: toml::Table = toml::from_str(&section).expect("target section");
    targets::build(system, section, &target_files().join("consumer.toml")).expect("target")
}

/// What `change` does to `account` on a system where a new password lifts a lock or not.
fn apply_to(account: &mut Account, change: &Change, new_password_unlocks: bool) {
    let values = change.values.iter().map(|v| v.expose().to_vec());
    if change.op.carries_values() && new_password_unlocks {
        account.locked = false;
    }
    match change.op {
        Op::Replace => account.values = values.collect(),
        Op::Add => account.values.extend(values),
        Op::Delete if change.values.is_empty() => account.values.clear(),
        Op::Delete => {
            for v in values {
                account.values.remove(&v);
            }
        }
        Op::Revoke => account.locked = true,
        Op::Resume => account.locked = false,
        Op::Remove => account.removed = true,
        Op::Lost => {}
    }
}

// ---- the consumer's world -------------------------------------------------------------------

/// What the consumer's targets and its opener share with the simulator: the targets' accounts,
/// every envelope an agent made, and the per-apply checks of the oracle.
struct World {
    faults: bool,
    /// The targets' own randomness (when they fail).
    rng: Rng,
    targets: Vec<Target>,
    /// Every envelope an agent accepted, by (agent, seq).
    envelopes: HashMap<(usize, u64), Envelope>,
    /// When each was journaled.
    journaled_ms: HashMap<(usize, u64), u64>,
    /// Per target, user and register: the capture time of the last account op (for
    /// `"account"`) or of the newest replace (for `"password"`) applied there, and the
    /// consumer's life it was applied in (its crashes counted).
    applied_order: HashMap<(usize, String, &'static str), (u64, u64)>,
    consumer_lives: u64,
    target_failures: u64,
    target_refusals: u64,
    /// Per target and account: the source user who wrote it, in which life of the consumer.
    owners: HashMap<(usize, String), (String, u64)>,
    /// How often an account's writer changed across a crash of the consumer.
    owner_changes: u64,
}

type SharedWorld = Arc<Mutex<World>>;

fn world(w: &SharedWorld) -> MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// The (agent, seq) an envelope's bytes name ([`envelope_bytes`]).
fn envelope_id(bytes: &[u8]) -> (usize, u64) {
    let word = |i: usize| {
        u64::from_le_bytes(
            bytes
                .get(i * 8..i * 8 + 8)
                .and_then(|b| b.try_into().ok())
                .expect("the simulator's own envelope"),
        )
    };
    (word(0) as usize, word(1))
}

/// How the consumer opens the simulator's envelopes (no cryptography: the decisions never see
/// it).
struct SimOpener(SharedWorld);

impl Open for SimOpener {
    fn open(&self, bytes: &[u8]) -> OpenResult {
        let id = envelope_id(bytes);
        let e = world(&self.0)
            .envelopes
            .get(&id)
            .cloned()
            .expect("an envelope some agent made");
        Ok(Opened {
            agent: agent_name(id.0),
            seq: id.1,
            hlc: e.hlc,
            change: e.change,
            certified: None,
        })
    }
}

/// A target system in memory, behind the consumer's real `Target` trait: it fails now and
/// then (busy), and otherwise does what its kind declares (a new password lifts a revoke's lock
/// where `Limits::new_password_unlocks` says so).
struct ModelTarget {
    world: SharedWorld,
    t: usize,
    limits: Limits,
}

impl targets::Target for ModelTarget {
    fn apply(&self, change: &Change, account: &str) -> Outcome {
        let mut w = world(&self.world);
        // Now and then a target refuses a change for good (a dead letter, for the operator).
        if w.faults && w.rng.chance(10) {
            w.target_refusals += 1;
            return Outcome::Failed("refused (simulated)".into());
        }
        if w.faults && w.rng.chance(100) {
            w.target_failures += 1;
            if std::env::var_os("PWSYNC_SIM_TRACE").is_some() {
                eprintln!(
                    "busy at {}: {} {}",
                    w.targets[self.t].system, change.user, change.op
                );
            }
            return Outcome::RetryLater("busy (simulated)".into());
        }
        // The pipeline puts a revoke's lock back after a password change, as itself: the one
        // change applied that no agent made.
        let Some(id) = change.attributes.get(SIM_ID).map(|id| sim_id(id)) else {
            assert!(
                change.op == Op::Revoke && change.values.is_empty(),
                "applied a change no agent made: {change:?}"
            );
            return self.write(&mut w, change, account, None);
        };
        let e = w.envelopes[&id].clone();
        assert!(
            *change == e.change,
            "applied {change:?}, not the change of agent {} seq {}",
            id.0,
            id.1
        );
        // Order (G3) at each target, within one life of the consumer (a crash replays from the
        // durable cursor, which may apply an older change again for a moment): a user's
        // account ops reach it in capture order (a remove is final whenever it was captured,
        // so it is the one that may land after a newer one), and no value op lands under a
        // newer replace (an add or delete arriving late lands before the later ones are
        // applied again). A backfill stands outside the registers: a real change captured
        // before it still applies after it.
        if let Some(register) = decide::register_of(change.op)
            .filter(|_| change.op != Op::Remove && !change.is_backfill())
        {
            let capture = decide::capture_time(e.hlc, w.journaled_ms[&id]).0;
            let key = (self.t, change.user.clone(), register);
            let life = w.consumer_lives;
            if let Some(&(last, in_life)) = w.applied_order.get(&key) {
                let what = if register == "password" {
                    "replace"
                } else {
                    "account op"
                };
                assert!(
                    capture >= last || in_life != life,
                    "target {} user {}: {} captured at {capture} applied after a {what} captured at {last} (agent {} seq {})",
                    w.targets[self.t].system,
                    change.user,
                    change.op,
                    id.0,
                    id.1
                );
            }
            if register == "account" || change.op == Op::Replace {
                w.applied_order.insert(key, (capture, life));
            }
        }
        self.write(&mut w, change, account, Some(id))
    }

    fn check(&self) -> Result<(), Unusable> {
        Ok(())
    }

    fn limits(&self) -> Limits {
        self.limits.clone()
    }
}

/// The (agent, seq) a [`SIM_ID`] attribute names.
fn sim_id(id: &str) -> (usize, u64) {
    let (agent, seq) = id.split_once(':').expect("agent:seq");
    (
        agent.parse().expect("an agent index"),
        seq.parse().expect("a seq"),
    )
}

impl ModelTarget {
    /// Writes `change` (of envelope `id`, or the pipeline's relock) to `account`.
    fn write(
        &self,
        w: &mut World,
        change: &Change,
        account: &str,
        id: Option<(usize, u64)>,
    ) -> Outcome {
        if std::env::var_os("PWSYNC_SIM_TRACE").is_some() {
            eprintln!(
                "apply at {}: {} {} {:?} (agent {} seq {})",
                w.targets[self.t].system,
                change.user,
                change.op,
                change
                    .values
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.expose()).into_owned())
                    .collect::<Vec<_>>(),
                id.map_or(usize::MAX, |id| id.0),
                id.map_or(0, |id| id.1)
            );
        }
        // Owners: within one life of the consumer, an account is written for one source user
        // only (the first whose change applied there holds it).
        let life = w.consumer_lives;
        match w.owners.get(&(self.t, account.to_string())) {
            Some((owner, in_life)) if owner != &change.user && *in_life == life => panic!(
                "target {} account {account}: {} {} applied to the account {owner} holds",
                w.targets[self.t].system, change.user, change.op
            ),
            Some((owner, _)) if owner != &change.user => w.owner_changes += 1,
            _ => {}
        }
        w.owners
            .insert((self.t, account.to_string()), (change.user.clone(), life));
        let unlocks = self.limits.new_password_unlocks;
        let account = w.targets[self.t]
            .accounts
            .entry(account.to_string())
            .or_default();
        apply_to(account, change, unlocks);
        Outcome::Applied
    }
}

/// The consumer's redb file, in memory. A crash keeps the database and drops what the state
/// had not flushed (`State::crashed`), as a file outlives its process.
#[derive(Debug, Clone, Default)]
struct MemoryFile(Arc<Mutex<Vec<u8>>>);

impl MemoryFile {
    fn bytes(&self) -> MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl redb::StorageBackend for MemoryFile {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.bytes().len() as u64)
    }

    fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let bytes = self.bytes();
        let start = offset as usize;
        bytes
            .get(start..start + len)
            .map(|b| b.to_vec())
            .ok_or_else(|| std::io::Error::other("read past the end"))
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.bytes().resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> std::io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut bytes = self.bytes();
        let start = offset as usize;
        if bytes.len() < start + data.len() {
            bytes.resize(start + data.len(), 0);
        }
        bytes[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// The simulated consumer's configuration: the one group, every agent in scope, retries on
/// the simulation's time scale.
fn consumer_config() -> ConsumerConfig {
    toml::from_str(&format!(
        r#"
group = "sim"
[keys]
decryption_keys = []
group_signing_key = "unused"
relay_public_key = "unused"
agents_dir = "unused"
[broker]
[state]
dir = "unused"
[retry]
base_ms = {RETRY_BASE_MS}
max_secs = 1
"#
    ))
    .expect("consumer config")
}

// ---- the world ----------------------------------------------------------------------------

struct Sim {
    rng: Rng,
    now: u64,
    faults: bool,
    agents: Vec<Agent>,
    mode: Mode,
    relays: Vec<Relay>,
    /// The shared journal (shared mode).
    stream: MemoryStream,
    next_msg_id: u64,
    /// Every record ever journaled, in offset order (the simulator's, not the relay's).
    history: Vec<JournalRecord>,
    /// Per agent, the highest seq in `history`.
    journaled_last: Vec<u64>,
    /// The relay the consumer group is attached to.
    consumer_relay: usize,
    /// The consumer: the daemon's own pipeline, over its real state (a redb database in
    /// memory), the targets of `world` and the simulated clock. `None` only while it restarts.
    consumer: Option<Pipeline>,
    /// The committed offset the consumer last made durable and sent.
    durable_committed: u64,
    /// The simulated time, as the consumer's clock reads it.
    clock: Arc<AtomicU64>,
    /// Draws of the consumer's retry jitter so far (each one a hash of the seed and the draw).
    jitter: Arc<AtomicU64>,
    world: SharedWorld,
    /// Messages in flight: (due time, tie-break, from, to, message).
    net: Vec<(u64, u64, Node, Node, Message)>,
    down_until: HashMap<NodeKey, u64>,
    cut_until: HashMap<NodeKey, u64>,
    changes_made: usize,
    sent: u64,
    stats: Stats,
}

/// How often each fault and each decision happened: a run that met none of them proves
/// nothing, so the test requires every one of them across its seeds.
#[derive(Default, Debug)]
struct Stats(BTreeMap<String, u64>);

impl Stats {
    fn bump(&mut self, what: &str) {
        self.add_n(what, 1);
    }
    fn add_n(&mut self, what: &str, n: u64) {
        *self.0.entry(what.to_string()).or_default() += n;
    }
    fn add(&mut self, other: &Stats) {
        for (k, v) in &other.0 {
            self.add_n(k, *v);
        }
    }
}

type NodeKey = (u8, usize);

fn key(n: Node) -> NodeKey {
    match n {
        Node::Agent(i) => (0, i),
        Node::Relay(r) => (1, r),
        Node::Consumer => (2, 0),
    }
}

fn agent_name(i: usize) -> String {
    format!("host-{i}")
}

impl Sim {
    fn new(seed: u64, mode: Mode) -> Sim {
        let mut rng = Rng(seed);
        let relays = match mode {
            Mode::Embedded => 1,
            Mode::Shared => 2,
        };
        let targets = vec![
            target("sys-a", "htpasswd", &[], &[("erin", "dave")]),
            // dave has no account on sys-b.
            target("sys-b", "postgres", &["dave"], &[]),
        ];
        // host-0 is on time; host-1 runs 400 days ahead; host-2 is system sys-b itself.
        let skews = [0, 400 * DAY_MS, rng.below(2_000)];
        let agents = (0..3)
            .map(|i| Agent {
                origin: if i == 2 {
                    "sys-b".into()
                } else {
                    agent_name(i)
                },
                origin_target: (i == 2).then_some(1),
                skew_ms: skews[i],
                spool: BTreeMap::new(),
                next_seq: 1,
                clock: HybridClock::default(),
                sender: agent_sender(Seq(0), relays, 0),
                relay: 0,
            })
            .collect();
        let world = Arc::new(Mutex::new(World {
            faults: true,
            rng: Rng(rng.next()),
            targets,
            envelopes: HashMap::new(),
            journaled_ms: HashMap::new(),
            applied_order: HashMap::new(),
            consumer_lives: 0,
            target_failures: 0,
            target_refusals: 0,
            owners: HashMap::new(),
            owner_changes: 0,
        }));
        let mut sim = Sim {
            jitter: Arc::new(AtomicU64::new(rng.next())),
            rng,
            now: 0,
            faults: true,
            agents,
            mode,
            relays: (0..relays)
                .map(|_| Relay {
                    journal: MemoryJournal::default(),
                    node: relay_node(Offset(0), 0),
                    waiting: Vec::new(),
                    appending: None,
                })
                .collect(),
            stream: MemoryStream::default(),
            next_msg_id: 0,
            history: Vec::new(),
            journaled_last: vec![0; 3],
            consumer_relay: 0,
            consumer: None,
            durable_committed: 0,
            clock: Arc::new(AtomicU64::new(EPOCH_MS)),
            world,
            net: Vec::new(),
            down_until: HashMap::new(),
            cut_until: HashMap::new(),
            changes_made: 0,
            sent: 0,
            stats: Stats::default(),
        };
        let state = State::open_on(MemoryFile::default()).expect("the consumer's state");
        sim.consumer = Some(sim.start_consumer(state));
        sim
    }

    fn is_down(&self, n: Node) -> bool {
        self.down_until.get(&key(n)).is_some_and(|t| *t > self.now)
    }

    fn is_cut(&self, n: Node) -> bool {
        self.cut_until.get(&key(n)).is_some_and(|t| *t > self.now)
    }

    fn send(&mut self, from: Node, to: Node, m: Message) {
        let (drop, dup) = if self.faults { (100, 50) } else { (0, 0) };
        if self.rng.chance(drop) {
            self.stats.bump("messages dropped");
            return;
        }
        let copies = if self.rng.chance(dup) {
            self.stats.bump("messages duplicated");
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(if self.faults { 40 } else { 5 });
            self.sent += 1;
            self.net
                .push((self.now + delay, self.sent, from, to, m.clone()));
        }
    }

    // ---- agents --------------------------------------------------------------------------

    fn make_change(&mut self) {
        let i = self.rng.below(3) as usize;
        if self.is_down(Node::Agent(i)) {
            return; // the person's system is down; nothing is captured
        }
        let at_origin = self.agents[i].origin_target.is_some();
        // sys-b's own people are alice and bob (the first two), and they change passwords there
        // too; every
        // user gets value adds and deletes, from sys-b as from elsewhere (ordered in capture
        // order as whole values: a late one takes its place).
        let u = if at_origin {
            self.rng.below(2)
        } else {
            self.rng.below(USERS.len() as u64)
        } as usize;
        let user = USERS[u];
        let n = self.changes_made;
        let op = match (at_origin, self.rng.below(100)) {
            (_, 0..=69) => Op::Replace,
            (_, 70..=77) => Op::Delete,
            (_, 78..=85) => Op::Add,
            (true, _) => Op::Replace,
            (false, 86..=92) => Op::Revoke,
            (false, 93..=98) => Op::Resume,
            _ => Op::Remove,
        };
        // Sometimes the same value again (the echo rule must still apply real changes); a
        // delete names a recent value (one of the last few made), or none (every value goes).
        let value = if op == Op::Delete {
            format!("pw-{}", n.saturating_sub(self.rng.below(6) as usize))
        } else if self.rng.chance(150) {
            format!("pw-{}", n / 2)
        } else {
            format!("pw-{n}")
        };
        let values = if op.carries_values() && !(op == Op::Delete && self.rng.chance(150)) {
            vec![Secret::from(value.as_str())]
        } else {
            vec![]
        };
        // Now and then a password seen at a login on host-0 or host-1 (a backfill): it fills
        // only a user pwsync knows nothing of, where pwsync never wrote.
        let backfill = !at_origin && op == Op::Replace && self.rng.chance(60);
        let a = &mut self.agents[i];
        let mut change = Change::new(user, a.origin.clone(), op, values);
        if backfill {
            change
                .attributes
                .insert(BACKFILL_ATTRIBUTE.into(), "1".into());
        }
        let hlc = a.clock.tick(EPOCH_MS + self.now + a.skew_ms);
        let seq = a.next_seq;
        a.next_seq += 1;
        change
            .attributes
            .insert(SIM_ID.into(), format!("{i}:{seq}"));
        a.spool.insert(
            seq,
            Envelope {
                agent: i,
                seq,
                hlc,
                change: change.clone(),
            },
        );
        let mut w = world(&self.world);
        // Made on sys-b, it is in sys-b's store at once.
        if let Some(t) = a.origin_target {
            let unlocks = w.targets[t].new_password_unlocks;
            let account = w.targets[t].accounts.entry(user.into()).or_default();
            apply_to(account, &change, unlocks);
        }
        w.envelopes.insert(
            (i, seq),
            Envelope {
                agent: i,
                seq,
                hlc,
                change,
            },
        );
        drop(w);
        self.changes_made += 1;
    }

    fn agent_tick(&mut self, i: usize) {
        let now = self.now;
        match self.agents[i].sender.on_timeout(now) {
            Some(AfterTimeout::Resend { .. }) => self.stats.bump("agent resends"),
            Some(AfterTimeout::NextRelay) => {
                // The forwarder leaves the relay and connects to the next one.
                self.stats.bump("agent failovers");
                let a = &mut self.agents[i];
                a.relay = (a.relay + 1) % self.relays.len();
                a.sender.on_connected(now);
            }
            None => {}
        }
        let a = &mut self.agents[i];
        let Some((from, want)) = a.sender.wants() else {
            return;
        };
        let batch: Vec<Envelope> = a
            .spool
            .range(from.0..)
            .take(want)
            .map(|(_, e)| e.clone())
            .collect();
        if let Some(last) = batch.last() {
            a.sender.sent(Seq(last.seq + 1), now);
            let to = Node::Relay(a.relay);
            self.send(Node::Agent(i), to, Message::Up(batch));
        }
    }

    fn agent_ack(&mut self, i: usize, through: u64) {
        let now = self.now;
        let a = &mut self.agents[i];
        let _ = a
            .clock
            .observe_at(Hlc::new(EPOCH_MS + now, 0), EPOCH_MS + now + a.skew_ms);
        match a.sender.on_ack(Seq(through), Seq(a.next_seq), now) {
            AfterAck::Delete { through, .. } => {
                let through = through.0;
                // Custody: the journal must hold everything this deletes.
                let journaled = match self.mode {
                    Mode::Embedded => self.relays[0].journal.agent_seq(&agent_id(i)),
                    Mode::Shared => self.stream.agent_last(&agent_id(i)),
                };
                assert!(
                    journaled >= through,
                    "agent {i} deleted through seq {through}, the journal holds only {journaled}"
                );
                let keep = self.agents[i].spool.split_off(&(through + 1));
                self.agents[i].spool = keep;
            }
            AfterAck::Resend { .. } | AfterAck::Nothing => {}
            AfterAck::Beyond => panic!("agent {i}: the relay acked seqs its spool never reached"),
        }
    }

    // ---- relays ---------------------------------------------------------------------------

    fn incoming(envelopes: &[Envelope]) -> Vec<Incoming> {
        envelopes
            .iter()
            .map(|e| Incoming {
                agent: agent_id(e.agent),
                seq: Seq(e.seq),
                hlc: e.hlc,
                envelope: envelope_bytes(e),
            })
            .collect()
    }

    /// A record landed in the journal at `offset`: offsets go up by one, and per agent the
    /// seqs without a gap and never twice (whatever the store, whichever relay appended).
    fn journaled(&mut self, offset: u64, envelope: Envelope, journaled_ms: u64) {
        assert_eq!(offset as usize, self.history.len() + 1, "journal offsets");
        let last = &mut self.journaled_last[envelope.agent];
        assert_eq!(
            envelope.seq,
            *last + 1,
            "agent {} seq {} journaled after its seq {}",
            envelope.agent,
            envelope.seq,
            last
        );
        *last = envelope.seq;
        world(&self.world)
            .journaled_ms
            .insert((envelope.agent, envelope.seq), journaled_ms);
        self.history.push(JournalRecord {
            journaled_ms,
            envelope,
        });
    }

    fn relay_up(&mut self, r: usize, envelopes: Vec<Envelope>) {
        if self.mode == Mode::Shared {
            self.relays[r].waiting.extend(envelopes);
            return;
        }
        let incoming = Sim::incoming(&envelopes);
        let applied = self.journal_apply(&incoming, &[]);
        for (e, intake) in envelopes.into_iter().zip(&applied.intake) {
            if let Intake::Appended(offset) = intake {
                self.journaled(offset.0, e, EPOCH_MS + self.now);
            }
        }
        self.relay_journaled(0, &applied, &[]);
    }

    /// One transaction of the embedded journal, as the relay's loop runs it (every declared
    /// group, no retention).
    fn journal_apply(&mut self, incoming: &[Incoming], commits: &[(GroupName, Offset)]) -> Applied {
        let journal = &mut self.relays[0].journal;
        let applied = journal
            .apply(incoming, commits, &[group()], 0, EPOCH_MS + self.now)
            .expect("the in-memory journal");
        if applied.pruned > 0 {
            let held_from = journal.first_offset().unwrap_or(journal.next_offset());
            self.pruned_through(held_from.0 - 1);
        }
        applied
    }

    /// Custody: the journal pruned through `offset`; the consumer's durable cursor must be
    /// there.
    fn pruned_through(&self, offset: u64) {
        assert!(
            offset <= self.durable_committed,
            "relay pruned through {offset}, the consumer's durable cursor is {}",
            self.durable_committed
        );
    }

    /// The offset the journal gives next.
    fn journal_end(&self) -> Offset {
        match self.mode {
            Mode::Embedded => self.relays[0].journal.next_offset(),
            Mode::Shared => Offset(self.stream.last_sequence() + 1),
        }
    }

    /// The group's committed offset as the journal holds it.
    fn journal_cursor(&self) -> Offset {
        match self.mode {
            Mode::Embedded => self.relays[0].journal.cursor(&group()),
            Mode::Shared => Offset(self.stream.register(&Register::Cursor(group())).0),
        }
    }

    /// After a journal transaction: the node's acks go out.
    fn relay_journaled(&mut self, r: usize, applied: &Applied, hellos: &[GroupName]) {
        let end = self.journal_end();
        let acks = self.relays[r]
            .node
            .on_journaled(applied, hellos, end, self.now);
        self.send_acks(r, acks);
    }

    fn send_acks(&mut self, r: usize, acks: Vec<(AgentId, Seq)>) {
        for (agent, seq) in acks {
            let agent = agent_index(&agent);
            self.send(
                Node::Relay(r),
                Node::Agent(agent),
                Message::Ack {
                    agent,
                    through: seq.0,
                },
            );
        }
    }

    fn relay_commit(&mut self, r: usize, offset: u64) {
        match self.relays[r].node.commit_kind(&group(), Offset(offset)) {
            Some(CommitKind::Advance) => {
                let applied = match self.mode {
                    Mode::Embedded => self.journal_apply(&[], &[(group(), Offset(offset))]),
                    Mode::Shared => {
                        let mut applied = Applied::default();
                        if offset < self.journal_end().0 {
                            let register = Register::Cursor(group());
                            match self.raise(&register, offset) {
                                Some(now) => {
                                    applied.advanced.insert(group(), Offset(now));
                                }
                                None => return, // the cluster failed it; the group commits again
                            }
                        }
                        applied
                    }
                };
                self.relay_journaled(r, &applied, &[]);
            }
            Some(CommitKind::Hello) => self.relay_journaled(r, &Applied::default(), &[group()]),
            None => panic!("the simulated group is declared"),
        }
    }

    /// Raises a shared register to at least `value` as the JetStream journal does (read, then
    /// compare-and-set on what was read; never lower); what it holds after, or `None` when the
    /// cluster failed the write (no leader). Checks that no register ever goes down.
    fn raise(&mut self, register: &Register, value: u64) -> Option<u64> {
        if self.faults && self.rng.chance(20) {
            self.stats.bump("shared journal failures");
            return None;
        }
        let (held, at) = self.stream.register(register);
        if !chain::needs_raising(held, value) {
            return Some(held);
        }
        assert!(
            value >= held,
            "{register:?} lowered from {held} to {value} (a relay raised it late)"
        );
        self.stream
            .write_register(register, value, at)
            .expect("read and written in one step");
        Some(value)
    }

    /// Shared mode: one step of the relay's append under way (or the start of the next one).
    fn relay_append_step(&mut self, r: usize) {
        let now = self.now;
        let relay = &mut self.relays[r];
        let Some(mut appending) = relay.appending.take() else {
            if relay.waiting.is_empty() {
                return;
            }
            let envelopes = std::mem::take(&mut relay.waiting);
            let batch = envelopes
                .iter()
                .map(|e| (agent_id(e.agent), Seq(e.seq)))
                .collect();
            relay.appending = Some(Appending {
                chain: ChainAppend::new(batch, SHARED_BUDGET, now),
                envelopes,
                phase: Phase::Read(now),
            });
            return;
        };
        let faults = self.faults;
        match &mut appending.phase {
            Phase::Read(at) if *at > now => {}
            Phase::Read(_) => {
                if faults && self.rng.chance(20) {
                    self.stats.bump("shared journal failures");
                    appending.chain.on_read_failed();
                    return self.end_round(r, appending);
                }
                let reads: Vec<u64> = appending
                    .chain
                    .reading()
                    .iter()
                    .map(|a| self.stream.agent_last(a))
                    .collect();
                let next_id = &mut self.next_msg_id;
                let links = appending
                    .chain
                    .on_read(self.stream.last_sequence(), &reads, || {
                        *next_id += 1;
                        format!("m{next_id}")
                    });
                appending.phase = Phase::Publish {
                    links,
                    answers: Vec::new(),
                };
            }
            Phase::Publish { links, answers } => {
                if let Some(link) = links.get(answers.len()).cloned() {
                    // Lost on the way (no leader), or stored with its answer lost.
                    let lost = faults && self.rng.chance(25);
                    let answer_lost = faults && !lost && self.rng.chance(25);
                    let answer = if lost {
                        Answer::Failed
                    } else {
                        let e = appending.envelopes[link.index].clone();
                        let record = Sim::incoming(std::slice::from_ref(&e))[0]
                            .encode_record(EPOCH_MS + now);
                        let stored = self.stream.publish(&link, &record, EPOCH_MS + now);
                        if let Answer::Stored { sequence } = stored {
                            if sequence as usize > self.history.len() {
                                self.journaled(sequence, e, EPOCH_MS + now);
                            }
                        }
                        if answer_lost {
                            Answer::Failed
                        } else {
                            stored
                        }
                    };
                    if matches!(answer, Answer::Failed) {
                        self.stats.bump("shared journal failures");
                    }
                    if answer == Answer::WrongLast {
                        self.stats.bump("shared journal contention");
                    }
                    answers.push(answer);
                }
                if answers.len() == links.len() {
                    for answer in answers.drain(..) {
                        if !appending.chain.on_answer(answer) {
                            break;
                        }
                    }
                    return self.end_round(r, appending);
                }
            }
            Phase::Raise(at) if *at > now => {}
            Phase::Raise(_) => {
                for (register, seq) in appending.chain.registers() {
                    if self.raise(&register, seq).is_none() {
                        return self.append_failed(r, appending);
                    }
                }
                let applied = Applied {
                    intake: appending.chain.intake().to_vec(),
                    ack: appending.chain.acks(),
                    ..Applied::default()
                };
                return self.relay_journaled(r, &applied, &[]);
            }
        }
        self.relays[r].appending = Some(appending);
    }

    fn end_round(&mut self, r: usize, mut appending: Appending) {
        match appending.chain.end_round(self.now) {
            RoundEnd::Placed => appending.phase = Phase::Raise(self.now + self.rng.below(20)),
            RoundEnd::Again { after_ms } => {
                self.stats.bump("shared journal rounds again");
                appending.phase = Phase::Read(self.now + after_ms);
            }
            RoundEnd::GiveUp => return self.append_failed(r, appending),
        }
        self.relays[r].appending = Some(appending);
    }

    /// The append failed: its agents are told where they stand.
    fn append_failed(&mut self, r: usize, appending: Appending) {
        self.stats.bump("shared journal appends failed");
        let agents: Vec<AgentId> = appending.chain.reading();
        let acks = self.relays[r].node.on_journal_failed(&agents);
        self.send_acks(r, acks);
    }

    /// Shared mode: what the group committed is purged, as a relay's pruning does: first the
    /// registers of the agents it empties are raised (a failed raise purges nothing).
    fn shared_prune(&mut self, cursor: Offset) {
        let Some(floor) = prune_floor([cursor.0]) else {
            return;
        };
        let floor = floor.min(self.stream.last_sequence());
        for (register, seq) in chain::registers_before_purge(self.stream.last_records(), floor) {
            if self.raise(&register, seq).is_none() {
                return;
            }
        }
        if self.stream.purge_through(floor) > 0 {
            self.stats.bump("shared journal pruned");
            self.pruned_through(floor);
        }
    }

    fn relay_tick(&mut self, r: usize) {
        let now = self.now;
        if self.mode == Mode::Shared {
            self.relay_append_step(r);
            // The shared view, read again now and then (the daemon does every second), and
            // pruning (every few seconds): between readings a relay's view of the cursor is
            // behind what the other relay moved it to.
            if self.rng.chance(100) {
                let cursor = self.journal_cursor();
                let end = self.journal_end();
                let cursors = BTreeMap::from([(group(), cursor)]);
                self.relays[r].node.on_shared_cursors(&cursors, end, now);
                if self.rng.chance(200) {
                    self.shared_prune(cursor);
                }
            }
        }
        if !self.relays[r].node.redeliver_overdue(now).is_empty() {
            self.stats.bump("relay redeliveries");
        }
        let end = self.journal_end();
        while let Some((from, want)) = self.relays[r].node.wants(&group(), end) {
            let (records, held_from) = match self.mode {
                Mode::Embedded => {
                    let j = &self.relays[0].journal;
                    (j.read_from(from, want), j.first_offset())
                }
                Mode::Shared => {
                    let first = self.stream.first_sequence();
                    (
                        self.stream.read_from(from, want),
                        (first <= self.stream.last_sequence()).then_some(Offset(first)),
                    )
                }
            };
            let step = self.relays[r]
                .node
                .plan(&group(), from, records, || held_from);
            if let Some(first) = step.pruned {
                // A relay whose view of the cursor is behind hears of records pruned after
                // the group committed them (the group holds everything below its cursor).
                assert!(
                    self.mode == Mode::Shared && first.0 - 1 <= self.durable_committed,
                    "records {}..{} pruned below the only group's cursor {}",
                    from.0,
                    first.0 - 1,
                    self.durable_committed
                );
                self.stats.bump("stale pruned notices");
            }
            for d in step.deliveries {
                let records = d
                    .records
                    .iter()
                    .enumerate()
                    .map(|(i, rec)| {
                        let known = &self.history[d.first.0 as usize - 1 + i];
                        assert_eq!(rec.envelope.as_slice(), envelope_bytes(&known.envelope));
                        assert_eq!(rec.journaled_ms, known.journaled_ms);
                        (rec.journaled_ms, known.envelope.clone())
                    })
                    .collect();
                self.relays[r].node.sent(&d, now);
                self.send(
                    Node::Relay(r),
                    Node::Consumer,
                    Message::Delivery {
                        first: d.first.0,
                        records,
                    },
                );
            }
            if step.stop {
                break;
            }
        }
    }

    // ---- consumer -------------------------------------------------------------------------

    /// The consumer process starting: the daemon's pipeline over `state`.
    fn start_consumer(&self, state: State) -> Pipeline {
        let targets = {
            let w = world(&self.world);
            w.targets
                .iter()
                .enumerate()
                .map(|(t, target)| {
                    let mut c =
                        configured(&target.system, target.kind, target.not_here, target.map);
                    c.target = Box::new(ModelTarget {
                        world: self.world.clone(),
                        t,
                        limits: c.limits.clone(),
                    });
                    c
                })
                .collect()
        };
        let opener = Arc::new(SimOpener(self.world.clone()));
        let clock = self.clock.clone();
        let jitter = self.jitter.clone();
        Pipeline::new(&consumer_config(), state, opener, targets, false)
            .expect("the consumer's pipeline")
            .with_clock(
                Arc::new(move || clock.load(Ordering::Relaxed)),
                Arc::new(move || {
                    let mut draw = Rng(jitter.fetch_add(1, Ordering::Relaxed));
                    draw.next() as u32
                }),
            )
    }

    fn consumer(&mut self) -> &mut Pipeline {
        self.consumer.as_mut().expect("the consumer runs")
    }

    /// A delivery reaches the consumer: each record through the pipeline, in offset order (a
    /// gap ends it: the relay sends again).
    fn consumer_delivery(&mut self, first: u64, records: Vec<(u64, Envelope)>) {
        let opener = SimOpener(self.world.clone());
        for (i, (journaled_ms, e)) in records.into_iter().enumerate() {
            let bytes = envelope_bytes(&e);
            let record = UnsealedRecord {
                offset: Offset(first + i as u64),
                journaled_ms,
                opened: opener.open(&bytes),
                bytes,
            };
            let taken = self.consumer().take(Unsealed::Records(vec![record]));
            if std::env::var_os("PWSYNC_SIM_TRACE").is_some() {
                let c = self.consumer.as_ref().expect("the consumer runs");
                eprintln!(
                    "t={} offset {} agent {} seq {} {} {}: {taken:?} {:?}",
                    self.now,
                    first + i as u64,
                    e.agent,
                    e.seq,
                    e.change.user,
                    e.change.op,
                    (c.status.users.get(&e.change.user), &c.status.counters)
                );
            }
            if taken == Taken::Gap {
                break;
            }
        }
        if self.rng.chance(600) {
            self.consumer_flush();
        }
    }

    /// The consumer makes its state durable and commits (as its loop does after deliveries).
    fn consumer_flush(&mut self) {
        let consumer = self.consumer();
        consumer.state.flush().expect("the consumer's state");
        let at = consumer.state.committed().0;
        self.durable_committed = at;
        let to = Node::Relay(self.consumer_relay);
        self.send(Node::Consumer, to, Message::Commit(at));
    }

    /// The dead letters an operator can do something about: all but changes refused because
    /// another source user holds their account (a configuration to fix, not a change to retry).
    fn dead_letters_to_retry(&mut self) -> Vec<u64> {
        let c = self.consumer();
        c.state.flush().expect("the consumer's state");
        c.state
            .dead_letters()
            .expect("the consumer's dead letters")
            .into_iter()
            .filter(|(_, d)| !d.error.contains("is held by source user"))
            .map(|(id, _)| id)
            .collect()
    }

    /// An operator, once the faults are over, retries the dead letters (`deadletter retry`)
    /// and drops those the consumer keeps because a newer change is at their target now
    /// (`deadletter drop`).
    fn operator_retries_dead_letters(&mut self) {
        let ids = self.dead_letters_to_retry();
        if ids.is_empty() {
            return;
        }
        // A change waits in a retry queue behind its user's earlier changes there, and later
        // ones wait behind it: none can be judged older than what its target has when its turn
        // comes (one superseded by a newer replace meanwhile leaves the queue, counted).
        let judged_older: Vec<String> = self
            .consumer()
            .state
            .dead_letters()
            .expect("the consumer's dead letters")
            .into_iter()
            .filter(|(_, d)| d.error.starts_with("not applied: a newer"))
            .map(|(_, d)| {
                format!(
                    "{} {} at {} (agent {} seq {}): {}",
                    d.user, d.op, d.target, d.agent, d.seq, d.error
                )
            })
            .collect();
        assert!(
            judged_older.is_empty(),
            "changes judged older when their turn in a retry queue came: {judged_older:?}"
        );
        let mut lines = Vec::new();
        self.consumer()
            .retry_dead_letters(
                &ids,
                &mut |line| {
                    if std::env::var_os("PWSYNC_SIM_TRACE").is_some() {
                        eprintln!("operator: {line}");
                    }
                    lines.push(line)
                },
                &mut |_, _| {},
            )
            .expect("retrying dead letters");
        let older: Vec<u64> = lines
            .iter()
            .filter(|l| l.contains("refused, kept:"))
            .filter_map(|l| l.split(':').next().and_then(|id| id.parse().ok()))
            .collect();
        self.stats.add_n("dead letters retried", ids.len() as u64);
        self.stats
            .add_n("dead letters dropped as older", older.len() as u64);
        self.consumer()
            .drop_dead_letters(&older, false)
            .expect("dropping dead letters");
    }

    /// What the consumer counted (each reason a record was skipped, what it restored, ...),
    /// into the run's statistics.
    fn collect_consumer_counters(&mut self) {
        if let Some(c) = &self.consumer {
            for (what, n) in &c.status.counters {
                self.stats.add_n(what, *n);
            }
        }
    }

    /// Shared mode: the consumer's relay is down or cut off; it moves to the other and says
    /// where it stands (a commit at its durable cursor: a hello).
    fn consumer_failover(&mut self) {
        let at = Node::Relay(self.consumer_relay);
        if self.mode == Mode::Shared && (self.is_down(at) || self.is_cut(at)) && self.rng.chance(50)
        {
            self.stats.bump("consumer failovers");
            self.consumer_relay = (self.consumer_relay + 1) % self.relays.len();
            self.consumer_flush();
        }
    }

    // ---- faults and the schedule --------------------------------------------------------------

    fn crash(&mut self, n: Node) {
        let downtime = 1 + self.rng.below(300);
        self.down_until.insert(key(n), self.now + downtime);
        let now = self.now + downtime;
        match n {
            Node::Agent(i) => {
                let a = &mut self.agents[i];
                let acked = a.spool.keys().next().map_or(a.next_seq, |s| *s) - 1;
                a.sender = agent_sender(Seq(acked), self.relays.len(), now);
            }
            Node::Relay(r) => {
                // An append under way is lost with the process: what it stored stays, unacked.
                let committed = self.journal_cursor();
                let relay = &mut self.relays[r];
                relay.node = relay_node(committed, now);
                relay.waiting.clear();
                relay.appending = None;
            }
            Node::Consumer => {
                // The process dies: what it did not flush is gone; it starts again on its file.
                self.collect_consumer_counters();
                let state = self
                    .consumer
                    .take()
                    .expect("the consumer runs")
                    .into_state();
                let state = state.crashed().expect("the consumer's state");
                world(&self.world).consumer_lives += 1;
                let consumer = self.start_consumer(state);
                self.durable_committed = consumer.state.committed().0;
                self.consumer = Some(consumer);
            }
        }
    }

    fn step(&mut self) {
        self.now += 1;
        self.clock.store(EPOCH_MS + self.now, Ordering::Relaxed);
        let nodes: Vec<Node> = (0..3)
            .map(Node::Agent)
            .chain((0..self.relays.len()).map(Node::Relay))
            .chain([Node::Consumer])
            .collect();
        if self.faults {
            for &n in &nodes {
                if !self.is_down(n) && self.rng.chance(2) {
                    self.crash(n);
                    self.stats.bump("crashes");
                }
                if self.rng.chance(3) {
                    let d = 1 + self.rng.below(500);
                    self.cut_until.insert(key(n), self.now + d);
                    self.stats.bump("partitions");
                }
            }
        }
        // Deliver what is due, in due order (ties in send order).
        self.net.sort_by_key(|m| (m.0, m.1));
        let due = self.net.partition_point(|m| m.0 <= self.now);
        let batch: Vec<_> = self.net.drain(..due).collect();
        for (_, _, from, to, m) in batch {
            if self.is_down(to) || self.is_cut(to) || self.is_cut(from) {
                continue;
            }
            match (to, m) {
                (Node::Relay(r), Message::Up(envs)) => self.relay_up(r, envs),
                (Node::Relay(r), Message::Commit(o)) => self.relay_commit(r, o),
                (Node::Agent(i), Message::Ack { agent, through }) if agent == i => {
                    self.agent_ack(i, through)
                }
                // Only the relay the consumer is attached to has it listening.
                (Node::Consumer, Message::Delivery { first, records })
                    if from == Node::Relay(self.consumer_relay) =>
                {
                    self.consumer_delivery(first, records)
                }
                _ => {}
            }
        }
        for &n in &nodes {
            if self.is_down(n) {
                continue;
            }
            match n {
                Node::Agent(i) => self.agent_tick(i),
                Node::Relay(r) => self.relay_tick(r),
                Node::Consumer => {
                    self.consumer_failover();
                    // The daemon looks at its retry queues between deliveries, not each ms.
                    if self.now.is_multiple_of(10) {
                        self.consumer()
                            .run_retries()
                            .expect("the consumer's retries");
                    }
                    if !self.faults && self.now.is_multiple_of(100) {
                        self.operator_retries_dead_letters();
                    }
                    if self.now.is_multiple_of(50) {
                        self.consumer_flush();
                    }
                }
            }
        }
    }

    fn quiescent(&mut self) -> bool {
        self.agents.iter().all(|a| a.spool.is_empty())
            && self.journal_cursor().0 == self.history.len() as u64
            && self.durable_committed == self.history.len() as u64
            && self
                .consumer
                .as_ref()
                .is_some_and(|c| c.status.targets.values().all(|t| t.retry_depth == 0))
            && (self.is_down(Node::Consumer) || self.dead_letters_to_retry().is_empty())
    }

    /// Runs `changes` changes through the faults, then heals and drains.
    fn run(&mut self, changes: usize) {
        let mut steps = 0u64;
        while self.changes_made < changes {
            if self.rng.chance(80) {
                self.make_change();
            }
            self.step();
            steps += 1;
            assert!(steps < 1_000_000, "the change phase did not end");
        }
        self.faults = false;
        world(&self.world).faults = false;
        let heal_from = self.now;
        while !self.quiescent() {
            self.step();
            assert!(
                self.now - heal_from < 120_000,
                "did not drain within 120 s of simulated time after the faults stopped"
            );
        }
    }

    // ---- the oracle -----------------------------------------------------------------------

    /// Where each target should be, per user, by the ordering rule, from the journal alone:
    /// account ops last-writer-wins by capture time (remove final, whenever captured), and the
    /// value ops (replace, add, delete) folded in capture order, then journal order, from what
    /// a backfill left; a revoked account locked.
    fn expected(&self) -> Vec<BTreeMap<String, Account>> {
        let w = world(&self.world);
        let targets = &w.targets;
        let mut want = vec![BTreeMap::<String, Account>::new(); targets.len()];
        let mut account_at: HashMap<&str, u64> = HashMap::new();
        let mut value_ops: BTreeMap<&str, Vec<(u64, usize, &Change)>> = BTreeMap::new();
        let mut removed: BTreeSet<&str> = BTreeSet::new();
        let mut revoked: BTreeSet<&str> = BTreeSet::new();
        let mut backfilled: BTreeSet<(usize, &str)> = BTreeSet::new();
        for (n, r) in self.history.iter().enumerate() {
            let c = &r.envelope.change;
            let user = c.user.as_str();
            if removed.contains(user) {
                continue;
            }
            let capture = r.envelope.hlc.0.min(Hlc::new(r.journaled_ms, u16::MAX).0);
            if std::env::var_os("PWSYNC_SIM_TRACE").is_some() {
                eprintln!(
                    "journal: {} {} {:?} from {} seq {} capture {} journaled {}",
                    user,
                    c.op,
                    c.values
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.expose()).into_owned())
                        .collect::<Vec<_>>(),
                    r.envelope.agent,
                    r.envelope.seq,
                    Hlc(capture),
                    r.journaled_ms
                );
            }
            if c.is_backfill() {
                // Only for a user with no op in either register yet, and only where pwsync
                // has not written for them (an earlier backfill).
                if value_ops.contains_key(user) || account_at.contains_key(user) {
                    continue;
                }
                for (t, want) in want.iter_mut().enumerate() {
                    if targets[t].not_here.contains(&user) || !backfilled.insert((t, user)) {
                        continue;
                    }
                    apply_to(want.entry(user.to_string()).or_default(), c, true);
                }
                continue;
            }
            if c.op.carries_values() {
                value_ops.entry(user).or_default().push((capture, n, c));
                continue;
            }
            let newest = account_at.get(user).copied().unwrap_or(0);
            if capture < newest && c.op != Op::Remove {
                continue;
            }
            account_at.insert(user, capture.max(newest));
            match c.op {
                Op::Revoke => {
                    revoked.insert(user);
                }
                Op::Resume => {
                    revoked.remove(user);
                }
                _ => {
                    removed.insert(user);
                }
            }
        }
        for (t, want) in want.iter_mut().enumerate() {
            let users = value_ops.keys().chain(&removed).chain(&revoked);
            for &user in users {
                if targets[t].not_here.contains(&user) {
                    continue;
                }
                let a = want.entry(user.to_string()).or_default();
                let mut ops = value_ops.get(user).cloned().unwrap_or_default();
                ops.sort_by_key(|(capture, n, _)| (*capture, *n));
                for (_, _, c) in ops {
                    apply_to(a, c, true);
                }
                a.locked = revoked.contains(user);
                a.removed = removed.contains(user);
            }
        }
        want
    }

    fn check_end(&self) {
        let journaled: BTreeSet<(usize, u64)> = self
            .history
            .iter()
            .map(|r| (r.envelope.agent, r.envelope.seq))
            .collect();
        assert_eq!(
            journaled.len(),
            self.history.len(),
            "a change was journaled twice"
        );
        assert_eq!(
            journaled,
            world(&self.world).envelopes.keys().copied().collect(),
            "accepted changes missing from the journal"
        );
        // Targets here only ever fail for a while: nothing may end as a dead letter but a
        // change refused because another source user holds its account.
        if let Some(c) = &self.consumer {
            let dead: Vec<_> = c
                .state
                .dead_letters()
                .expect("the consumer's dead letters")
                .into_iter()
                .filter(|(_, d)| !d.error.contains("is held by source user"))
                .collect();
            assert!(
                dead.is_empty(),
                "dead letters of changes that could still apply: {:?}",
                dead.iter()
                    .map(|(_, d)| format!("{} {} at {}: {}", d.user, d.op, d.target, d.error))
                    .collect::<Vec<_>>()
            );
        }
        let expected = self.expected();
        let world = world(&self.world);
        for t in &world.targets {
            for user in t.not_here {
                assert!(
                    !t.accounts.contains_key(*user),
                    "{user} reached {}, whose routing excludes them",
                    t.system
                );
            }
        }
        for (t, want) in expected.iter().enumerate() {
            for (user, w) in want {
                // An account two users share holds whichever the owner rule let in: each
                // apply was checked instead.
                let target = &world.targets[t];
                let account = target.account_of(user);
                if target.shared(account) {
                    continue;
                }
                let got = target.accounts.get(account).cloned().unwrap_or_default();
                let same = if w.removed {
                    got.removed
                } else {
                    !got.removed && got.values == w.values && got.locked == w.locked
                };
                assert!(
                    same,
                    "target {} user {user}: want {w:?}, got {got:?}",
                    world.targets[t].system
                );
            }
        }
    }
}

fn run_seed(seed: u64, mode: Mode, changes: usize) -> Stats {
    let mut sim = Sim::new(seed, mode);
    sim.run(changes);
    sim.check_end();
    sim.collect_consumer_counters();
    let (failures, refusals, owner_changes) = {
        let w = world(&sim.world);
        (w.target_failures, w.target_refusals, w.owner_changes)
    };
    sim.stats.add_n("target failures", failures);
    sim.stats.add_n("target refusals", refusals);
    sim.stats
        .add_n("owner changed across a crash", owner_changes);
    sim.stats
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Every seed from `PWSYNC_SIM_FIRST` (0), `PWSYNC_SIM_SEEDS` of them (10,000), 100 changes
/// each, on every core, in `mode`; `PWSYNC_SIM_SEED` replays one. A failing seed prints
/// itself. Each of `required` must have happened in some seed.
fn run_seeds(mode: Mode, test: &str, required: &[&str]) {
    const CHANGES: usize = 100;
    if let Some(seed) = env_u64("PWSYNC_SIM_SEED") {
        eprintln!("seed {seed}: {:?}", run_seed(seed, mode, CHANGES).0);
        return;
    }
    let total = std::sync::Mutex::new(Stats::default());
    let first = env_u64("PWSYNC_SIM_FIRST").unwrap_or(0);
    let seeds = env_u64("PWSYNC_SIM_SEEDS").unwrap_or(10_000);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let total = &total;
            s.spawn(move || {
                let mut seed = first + t;
                while seed < first + seeds {
                    let result = std::panic::catch_unwind(|| run_seed(seed, mode, CHANGES));
                    if let Ok(stats) = &result {
                        total.lock().unwrap_or_else(|p| p.into_inner()).add(stats);
                    }
                    if let Err(e) = result {
                        let why = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        panic!(
                            "seed {seed} failed: {why}\nreplay: PWSYNC_SIM_SEED={seed} cargo test -p pwsync-tests --test sim {test} -- --nocapture"
                        );
                    }
                    seed += threads;
                }
            });
        }
    });
    let total = total.into_inner().unwrap_or_else(|p| p.into_inner());
    eprintln!(
        "{mode:?}: {seeds} seeds × {CHANGES} changes in {:.1} s: {:?}",
        started.elapsed().as_secs_f64(),
        total.0
    );
    let always = [
        "crashes",
        "partitions",
        "messages dropped",
        "messages duplicated",
        "relay redeliveries",
        "target failures",
        "clock_ahead",
        "stale",
        "echo",
        "after_remove",
        "origin_restored",
        "account_collision",
        "target refusals",
        "backfill",
        "backfill_applied",
        "backfill_superseded",
        "dead letters retried",
        "dead letters dropped as older",
    ];
    for what in always.iter().chain(required) {
        assert!(
            total.0.get(*what).copied().unwrap_or(0) > 0 || seeds < 1000,
            "no seed met {what:?}: the schedules are too tame"
        );
    }
}

/// One relay on the embedded journal's twin.
#[test]
fn ten_thousand_faulty_schedules_keep_every_guarantee() {
    run_seeds(
        Mode::Embedded,
        "ten_thousand_faulty_schedules_keep_every_guarantee",
        &["agent resends"],
    );
}

/// Two relays on one shared journal (JetStream's twin), agents and the consumer failing over
/// between them, the cluster refusing, losing answers and failing writes.
#[test]
fn ten_thousand_faulty_schedules_on_a_shared_journal_keep_every_guarantee() {
    run_seeds(
        Mode::Shared,
        "ten_thousand_faulty_schedules_on_a_shared_journal_keep_every_guarantee",
        &[
            "agent failovers",
            "consumer failovers",
            "shared journal failures",
            "shared journal contention",
            "shared journal rounds again",
            "shared journal appends failed",
            "shared journal pruned",
        ],
    );
}
