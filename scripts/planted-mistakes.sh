#!/usr/bin/env bash
# Plants known mistakes in the real nodes, one at a time, and checks that the simulator
# (tests/tests/sim.rs) catches each: the simulator is only worth its guarantees if breaking one
# of them makes it fail. Each plant is undone before the next, also on failure or Ctrl-C.
#
#   scripts/planted-mistakes.sh            # every plant, 2,000 seeds each
#   SEEDS=10000 scripts/planted-mistakes.sh
#
# Not part of the test command: each plant rebuilds the crates below it (minutes in all).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${SEEDS:-2000}"

# file @@ text in the real code @@ the mistake in its place @@ what it breaks (\n: a line break)
PLANTS=(
  "agent/src/sender.rs@@through: Seq(through),@@through: Seq(through + 1),@@custody: the agent deletes one envelope past the relay's ack"
  "agent/src/sender.rs@@if !self.connected || !self.window.overdue(now, self.timing.ack_timeout_ms) {@@if true {@@liveness: the agent never sends again after a lost envelope"
  "relay/src/journal/rules.rs@@cursors.into_iter().min().filter(|floor| *floor > 0)@@cursors.into_iter().min().filter(|floor| *floor > 0).map(|f| f + 1)@@custody: the relay prunes a record its group has not committed"
  "consumer/src/decide.rs@@change.op.carries_values() && account == AccountState::Revoked@@change.op.carries_values() && account == AccountState::Revoked && false@@revoke: a password change lifts a revoke's lock on htpasswd"
  "consumer/src/decide.rs@@    if waiting {@@    if false {@@order: a change overtakes an earlier change of its user that waits at a target"
  "consumer/src/decide.rs@@        Ok(last) => restore_at_origin(last, capture),@@        Ok(_) => false,@@agreement: a system that pwsync overwrote after its own newer change keeps the older value"
  "consumer/src/decide.rs@@    if hlc <= bound {@@    if true {@@order: a host whose clock runs ahead wins over later changes"
  "relay/src/journal/chain.rs@@Some(previous) => Expect::LastMsgId(previous.msg_id.clone()),@@Some(_) => Expect::LastSequence(last_sequence + links.len() as u64),@@shared journal: a chain expects L, L+1, … and lets a gap in when another relay's record takes a refused link's place"
  "relay/src/journal/chain.rs@@    held < wanted@@    held != wanted@@shared journal: a relay raising a register late takes it back down"
  "consumer/src/pipeline.rs@@change.op != Op::Remove\n            && !self.value_op_in_its_place@@true\n            && !self.value_op_in_its_place@@order: a queued remove is refused on retry when a newer account op applied meanwhile (a remove is final)"
  "consumer/src/pipeline.rs@@owner.as_ref().filter(|o| **o != change.user)@@owner.as_ref().filter(|_| false)@@owners: a change overwrites an account another source user holds"
  "relay/src/journal/chain.rs@@.filter(|(_, offset, _)| *offset <= upto)@@.filter(|(_, offset, _)| *offset <= upto && false)@@shared journal: pruning forgets an agent's seqs whose append never raised its register"
  "consumer/src/pipeline.rs@@if !made_here && written_before.is_none_or(|w| kept.at > w) {@@if true {@@values: an add or delete arriving late is applied, and the later ones are not applied again after it"
  "consumer/src/decide.rs@@Some(tail) if at > tail.floor => {@@Some(tail) => {@@values: a value op captured before the newest replace is applied when it arrives late"
)

restore() {
  if [[ -n "${BACKUP:-}" && -f "$BACKUP" ]]; then
    cp "$BACKUP" "$FILE"
    rm -f "$BACKUP"
  fi
}
trap restore EXIT

caught=0
for plant in "${PLANTS[@]}"; do
  FILE="${plant%%@@*}"; rest="${plant#*@@}"
  FROM="${rest%%@@*}"; rest="${rest#*@@}"
  TO="${rest%%@@*}"; WHAT="${rest#*@@}"
  BACKUP="$(mktemp)"
  cp "$FILE" "$BACKUP"
  FROM="$FROM" TO="$TO" python3 - "$FILE" <<'EOF'
import os, sys
path = sys.argv[1]
text = open(path).read()
# "\n" in a plant's text is a line break.
old, new = (os.environ[k].replace("\\n", "\n") for k in ("FROM", "TO"))
if text.count(old) != 1:
    sys.exit(f"{path}: the plant's text occurs {text.count(old)} times, not once: {old!r}")
open(path, "w").write(text.replace(old, new))
EOF
  echo "== $WHAT"
  if out="$(PWSYNC_SIM_SEEDS="$SEEDS" cargo test -q -p pwsync-tests --test sim 2>&1)"; then
    echo "   NOT CAUGHT in $SEEDS seeds"
  else
    seed="$(grep -oE 'seed [0-9]+ failed: .*' <<<"$out" | head -1)"
    echo "   caught: ${seed:-$(tail -3 <<<"$out")}"
    caught=$((caught + 1))
  fi
  restore
  BACKUP=""
done
echo "$caught of ${#PLANTS[@]} planted mistakes caught"
[[ "$caught" == "${#PLANTS[@]}" ]]
