#!/usr/bin/env bash
# TPU VM launcher for advprop_jax: one command line for any slice (v4-8 ... v4-128, v5litepod-*,
# v5p-*, v6e-*),
# or N slices joined over the data-centre network (multislice: --accelerator=2xv5litepod-256, a
# queued resource).
#
# Every remote step runs with `--worker=all`, so all hosts of a pod slice get the same code, the same pinned
# packages and the same training command, started together (the trainer calls jax.distributed.initialize()).
# Run `./launch_tpu.sh --help` for usage; add --dry-run to print the gcloud commands instead of running them.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIBTPU_FIND_LINKS="https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# Pattern for the training processes. The brackets keep pkill/pgrep from matching the remote shell whose
# command line contains this very pattern.
TRAIN_PATTERN='[a]dvprop_jax[.]main'

usage() {
  cat <<'EOF'
Usage: launch_tpu.sh <command> [options] [-- extra trainer args]

Commands:
  create   create the TPU VM (gcloud compute tpus tpu-vm create); N slices
           (--accelerator=NxTYPE): a queued
           resource of N nodes (gcloud compute tpus queued-resources create --node-count=N)
  setup    ship the code to every worker, install the pinned requirements.txt + jax[tpu] of the same
           version in REPO_DIR/.venv, then print jax version and device count per worker (fails on mismatch)
  train    kill stale training processes on all workers, then start the SAME trainer command on all workers:
             cd REPO_DIR && .venv/bin/python -m advprop_jax.main --config=CONFIG --workdir=WORKDIR [extra args]
           under nohup, log in ~/advprop_logs/train_<timestamp>.log (latest.log points to it) on each worker.
           Rerunning train resumes from the newest checkpoint in WORKDIR.
  status   training processes and last log lines on every worker
  logs     tail the log of worker 0 (or --worker=N); --follow to keep following
  stop     kill training on all workers
  delete   delete the TPU VM (asks for confirmation unless --yes)

Options (environment variable in brackets):
  --name NAME          TPU VM name                                    [ADVPROP_TPU_NAME]
  --zone ZONE          e.g. us-central2-b (v4), us-west4-a (v5e)      [ADVPROP_TPU_ZONE]
  --project PROJECT    GCP project (default: gcloud's configured one) [ADVPROP_TPU_PROJECT]
  --accelerator TYPE   e.g. v4-8, v4-32, v4-128, v5litepod-16, v5p-8, v6e-8   [ADVPROP_TPU_ACCELERATOR]
                       NxTYPE: N slices of TYPE (multislice, v4/v5litepod/v5p/v6e),
                       e.g. 2xv5litepod-256;
                       give it to every command (or set the variable): they then drive the queued
                       resource NAME and its nodes NAME-0 .. NAME-(N-1), every worker of every slice
  --version VERSION    TPU runtime version; default from the accelerator type:
                         v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                         v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e      [ADVPROP_TPU_VERSION]
  --spot               create a Spot VM          --preemptible   create a preemptible VM
  --config CONFIG      e.g. configs/efficientnet.py:b0                [ADVPROP_CONFIG]
  --workdir DIR        checkpoints/logs; gs://BUCKET/... (every host must see the same dir) [ADVPROP_WORKDIR]
  --repo-dir DIR       code location on the workers (default: advprop_jax, relative to ~) [ADVPROP_REPO_DIR]
  --git-url URL        setup: git clone URL on the workers instead of copying this checkout
  --commit SHA         setup with --git-url: the commit to check out (required with --git-url)
  --python VERSION     setup: Python of the venv, installed with uv if needed (default 3.11)
  --worker N           logs: which worker (default 0)
  --lines N            logs/status: how many log lines (default 100 for logs, 5 for status)
  --follow             logs: follow the log (tail -F)
  --yes                delete without asking
  --dry-run            print every command (one per line, prefixed with '+ ') instead of running it;
                       anywhere on the command line, also after --
  -h, --help           this help

Examples:
  ./launch_tpu.sh create --name=ap-b0 --zone=us-central2-b --accelerator=v4-32 --spot
  ./launch_tpu.sh setup  --name=ap-b0 --zone=us-central2-b
  ./launch_tpu.sh train  --name=ap-b0 --zone=us-central2-b --config=configs/efficientnet.py:b0 \
      --workdir=gs://BUCKET/advprop/b0 -- --config.data.data_dir=gs://BUCKET/tensorflow_datasets
  ./launch_tpu.sh create --name=ap-l2 --zone=us-west4-a --accelerator=2xv5litepod-256 --spot
EOF
}

die() { echo "launch_tpu.sh: error: $*" >&2; exit 1; }
usage_error() { echo "launch_tpu.sh: error: $*" >&2; echo "Run 'launch_tpu.sh --help' for usage." >&2; exit 2; }

# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
CMD=""
NAME="${ADVPROP_TPU_NAME:-}"
ZONE="${ADVPROP_TPU_ZONE:-}"
PROJECT="${ADVPROP_TPU_PROJECT:-}"
ACCELERATOR="${ADVPROP_TPU_ACCELERATOR:-}"
VERSION="${ADVPROP_TPU_VERSION:-}"
CONFIG="${ADVPROP_CONFIG:-}"
WORKDIR="${ADVPROP_WORKDIR:-}"
REPO_DIR="${ADVPROP_REPO_DIR:-advprop_jax}"
GIT_URL=""
COMMIT=""
PYTHON_VERSION="3.11"
WORKER="0"
LINES=""
FOLLOW=0
YES=0
DRY_RUN=0
SPOT=0
PREEMPTIBLE=0
EXTRA_ARGS=()
HAVE_EXTRA=0

# Value of an option given as `--opt=value` or `--opt value`; sets OPTVAL and SHIFT_BY.
take_value() {
  local opt="$1" arg="$2"
  shift 2
  if [[ "$arg" == *=* ]]; then
    OPTVAL="${arg#*=}"
    SHIFT_BY=1
  else
    [[ $# -ge 1 && "$1" != --* ]] || usage_error "option $opt needs a value${1:+ (got $1)}"
    OPTVAL="$1"
    SHIFT_BY=2
  fi
  [[ -n "$OPTVAL" ]] || usage_error "option $opt needs a non-empty value"
}

# --dry-run anywhere means a dry run: also after `--` (where the trainer's flags go) or where an option value
# was expected. A misplaced --dry-run must never run the real gcloud (which would also kill a running job).
for arg in "$@"; do
  case "$arg" in
    --dry-run|--dry-run=*) DRY_RUN=1 ;;
  esac
done

while [[ $# -gt 0 ]]; do
  arg="$1"
  opt="${arg%%=*}"
  case "$opt" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --yes|-y) YES=1; shift ;;
    --follow|-f) FOLLOW=1; shift ;;
    --name|--zone|--project|--accelerator|--accelerator-type|--version|--config|--workdir|--repo-dir|\
    --git-url|--commit|--python|--worker|--lines)
      take_value "$opt" "$@"
      case "$opt" in
        --name) NAME="$OPTVAL" ;;
        --zone) ZONE="$OPTVAL" ;;
        --project) PROJECT="$OPTVAL" ;;
        --accelerator|--accelerator-type) ACCELERATOR="$OPTVAL" ;;
        --version) VERSION="$OPTVAL" ;;
        --config) CONFIG="$OPTVAL" ;;
        --workdir) WORKDIR="$OPTVAL" ;;
        --repo-dir) REPO_DIR="$OPTVAL" ;;
        --git-url) GIT_URL="$OPTVAL" ;;
        --commit) COMMIT="$OPTVAL" ;;
        --python) PYTHON_VERSION="$OPTVAL" ;;
        --worker) WORKER="$OPTVAL" ;;
        --lines) LINES="$OPTVAL" ;;
      esac
      shift "$SHIFT_BY"
      ;;
    --)
      shift
      HAVE_EXTRA=1
      for arg in "$@"; do
        case "$arg" in
          --dry-run|--dry-run=*)  # the launcher's flag, misplaced: honoured above, not passed on
            echo "launch_tpu.sh: note: --dry-run after -- is the launcher's dry run (not passed to the trainer)" >&2 ;;
          --dry_run*|--dryrun*|-dry-run*|-dry_run*)
            usage_error "ambiguous '$arg' after --: write --dry-run for a dry run of the launcher" ;;
          *) EXTRA_ARGS+=("$arg") ;;
        esac
      done
      break
      ;;
    -*) usage_error "unknown option: $arg" ;;
    *)
      if [[ -z "$CMD" ]]; then
        CMD="$arg"; shift
      else
        usage_error "unexpected argument: $arg (trainer arguments go after --)"
      fi
      ;;
  esac
done

case "$CMD" in
  create|setup|train|status|logs|stop|delete) ;;
  "") usage >&2; echo "launch_tpu.sh: error: missing command" >&2; exit 2 ;;
  *) usage >&2; echo "launch_tpu.sh: error: unknown command: $CMD" >&2; exit 2 ;;
esac

if [[ "$HAVE_EXTRA" == 1 && "$CMD" != train ]]; then
  usage_error "arguments after -- are trainer arguments; only 'train' takes them"
fi

require() {  # require VALUE OPTION_NAME
  [[ -n "$1" ]] || usage_error "'$CMD' requires $2"
}

require "$NAME" "--name (or ADVPROP_TPU_NAME)"
require "$ZONE" "--zone (or ADVPROP_TPU_ZONE)"
[[ "$WORKER" =~ ^[0-9]+$ ]] || usage_error "--worker must be a worker index (0, 1, ...), got: $WORKER"
[[ -z "$LINES" || "$LINES" =~ ^[0-9]+$ ]] || usage_error "--lines must be a number, got: $LINES"
[[ "$SPOT" == 1 && "$PREEMPTIBLE" == 1 ]] && usage_error "--spot and --preemptible are exclusive"

# Multislice: --accelerator=NxTYPE is N slices of TYPE (a queued resource of N nodes).
SLICES=1
SLICE_TYPE="$ACCELERATOR"
if [[ "$ACCELERATOR" =~ ^[0-9.]+[xX] ]]; then
  [[ "$ACCELERATOR" =~ ^([1-9][0-9]*)x((v4|v5litepod|v5e|v5p|v6e)-[1-9][0-9]*)$ ]] \
    || usage_error "--accelerator=$ACCELERATOR: N slices are NxTYPE with N >= 1 and TYPE" \
                   "a v4, v5litepod," \
                   "v5p or v6e accelerator type, e.g. 2xv5litepod-256, 4xv4-32"
  SLICES="${BASH_REMATCH[1]}"
  SLICE_TYPE="${BASH_REMATCH[2]}"
fi
MULTISLICE=0
[[ "$SLICES" -gt 1 ]] && MULTISLICE=1
[[ "$MULTISLICE" == 1 && "$PREEMPTIBLE" == 1 ]] \
  && usage_error "--preemptible: multislice jobs are queued resources, which take --spot"
# The repo dir ends up inside remote shell commands: keep it to a plain path.
[[ "$REPO_DIR" =~ ^[A-Za-z0-9_./~-]+$ ]] || usage_error "--repo-dir must be a plain path, got: $REPO_DIR"
# A leading ~/ is the remote home; paths are relative to it anyway.
REPO_DIR="${REPO_DIR#\~/}"

# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
GCLOUD_COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_COMMON+=(--project="$PROJECT")

# Run a command, or print it (shell-quoted, copy-pasteable) with --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local quoted
    printf -v quoted '%q ' "$@"
    printf '+ %s\n' "${quoted% }"
  else
    "$@"
  fi
}

# Run a shell command line on the workers: remote_ssh all|N 'command'. Multislice: on every node
# (slice) of the queued resource for `all`, on the first slice's worker N otherwise.
remote_ssh() {
  local worker="$1" remote_cmd="$2"
  if [[ "$MULTISLICE" == 1 ]]; then
    local node=0
    [[ "$worker" == all ]] && node=all
    run gcloud compute tpus queued-resources ssh "$NAME" "${GCLOUD_COMMON[@]}" --node="$node" \
      --worker="$worker" --command="$remote_cmd"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_COMMON[@]}" --worker="$worker" \
      --command="$remote_cmd"
  fi
}

# Copy a local file to the home directory of every worker (of every slice): remote_scp FILE DEST.
remote_scp() {
  if [[ "$MULTISLICE" == 1 ]]; then
    run gcloud compute tpus queued-resources scp "$1" "$NAME:$2" "${GCLOUD_COMMON[@]}" \
      --node=all --worker=all
  else
    run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "${GCLOUD_COMMON[@]}" --worker=all
  fi
}

# Shell-quote all arguments into one string for a remote bash command line.
quote_all() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}

# Runtime version for an accelerator type.
default_version() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

# The jax version pinned in requirements.txt (the jax[tpu] we install must equal it).
pinned_jax_version() {
  local req="$SCRIPT_DIR/requirements.txt" v
  [[ -f "$req" ]] || die "requirements.txt not found next to launch_tpu.sh ($req)"
  v="$(sed -n -E 's/^jax==([^[:space:]#;]+).*/\1/p' "$req" | head -n 1)"
  [[ -n "$v" ]] || die "no 'jax==<version>' pin in $req"
  printf '%s' "$v"
}

# Kill training processes on all workers: TERM, wait up to 30 s, then KILL; free the TPU lock file.
kill_training_cmd() {
  printf '%s' "pkill -TERM -f '$TRAIN_PATTERN' || true; " \
    "for _ in \$(seq 30); do pgrep -f '$TRAIN_PATTERN' >/dev/null || break; sleep 1; done; " \
    "pkill -KILL -f '$TRAIN_PATTERN' || true; sleep 1; " \
    "rm -f /tmp/libtpu_lockfile 2>/dev/null || sudo rm -f /tmp/libtpu_lockfile || true; " \
    "echo \"\$(hostname): no training process left\""
}

# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------
cmd_create() {
  require "$ACCELERATOR" "--accelerator (or ADVPROP_TPU_ACCELERATOR), e.g. v4-32"
  if [[ -z "$VERSION" ]]; then
    VERSION="$(default_version "$SLICE_TYPE")" \
      || usage_error "no default runtime version for accelerator '$ACCELERATOR': pass --version"
  fi
  local args=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_COMMON[@]}"
              --accelerator-type="$ACCELERATOR" --version="$VERSION")
  if [[ "$MULTISLICE" == 1 ]]; then
    # Multislice needs a queued resource; the platform gives every worker the MEGASCALE_* settings
    # from which the trainer's jax.distributed.initialize() and mesh find all slices.
    args=(gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_COMMON[@]}"
          --accelerator-type="$SLICE_TYPE" --runtime-version="$VERSION" --node-count="$SLICES"
          --node-prefix="$NAME")
  fi
  [[ "$SPOT" == 1 ]] && args+=(--spot)
  [[ "$PREEMPTIBLE" == 1 ]] && args+=(--preemptible)
  run "${args[@]}"
}

cmd_setup() {
  local jax_version remote repo_q
  jax_version="$(pinned_jax_version)"
  repo_q="$(quote_all "$REPO_DIR")"

  # 1. The code: the same commit on every worker.
  if [[ -n "$GIT_URL" ]]; then
    require "$COMMIT" "--commit with --git-url (every worker must check out the same commit)"
    remote="set -e; "
    remote+="if [ -d $repo_q/.git ]; then git -C $repo_q fetch --quiet origin; "
    remote+="else git clone --quiet $(quote_all "$GIT_URL") $repo_q; fi; "
    remote+="git -C $repo_q checkout --quiet --detach $(quote_all "$COMMIT"); "
    remote+="git -C $repo_q rev-parse HEAD > $repo_q/.advprop_commit"
    remote_ssh all "$remote"
  else
    # Ship HEAD of this checkout (git archive: no venvs, caches or untracked files).
    local head tarball
    head="$(git -C "$SCRIPT_DIR" rev-parse HEAD 2>/dev/null)" \
      || die "$SCRIPT_DIR is not a git checkout; use --git-url/--commit"
    if [[ -n "$(git -C "$SCRIPT_DIR" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
      echo "launch_tpu.sh: warning: uncommitted changes are NOT shipped; workers get commit $head" >&2
    fi
    tarball="${TMPDIR:-/tmp}/advprop_jax_${head:0:12}.tar.gz"
    run git -C "$SCRIPT_DIR" archive --format=tar.gz -o "$tarball" HEAD
    remote_scp "$tarball" advprop_jax_src.tar.gz
    # Replace the code but keep the venv (reinstalling pinned versions into it is cheap and exact).
    remote="set -e; mkdir -p $repo_q; "
    remote+="find $repo_q -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; "
    remote+="tar -xzf advprop_jax_src.tar.gz -C $repo_q; rm -f advprop_jax_src.tar.gz; "
    remote+="echo $(quote_all "$head") > $repo_q/.advprop_commit"
    remote_ssh all "$remote"
    [[ "$DRY_RUN" == 1 ]] || rm -f "$tarball"
  fi

  # 2. The same pinned packages: requirements.txt + jax[tpu] of the pinned jax version, in one resolve.
  #    uv provides the pinned Python (the TPU images ship an older system Python).
  remote="set -e; export PATH=\"\$HOME/.local/bin:\$PATH\"; "
  remote+="command -v uv >/dev/null || python3 -m pip install --user --quiet uv; "
  remote+="cd $repo_q; "
  remote+="[ -x .venv/bin/python ] || uv venv --quiet --python $(quote_all "$PYTHON_VERSION") .venv; "
  remote+="uv pip install --quiet --python .venv/bin/python -r requirements.txt "
  remote+="$(quote_all "jax[tpu]==$jax_version") -f $(quote_all "$LIBTPU_FIND_LINKS")"
  remote_ssh all "$remote"

  # 3. Make mismatches visible: one line per worker (run on all workers at once, as on a pod they must be).
  local check
  check="cd $repo_q && echo \"ADVPROP_CHECK host=\$(hostname) commit=\$(cat .advprop_commit) \$(.venv/bin/python -c "
  check+="'import jax; print(jax.__version__, jax.device_count())')\""
  if [[ "$DRY_RUN" == 1 ]]; then
    remote_ssh all "$check"
    return 0
  fi
  local out
  out="$(mktemp)"
  remote_ssh all "$check" 2>&1 | tee "$out"
  local lines versions commits counts
  lines="$(grep -o 'ADVPROP_CHECK.*' "$out" || true)"
  rm -f "$out"
  [[ -n "$lines" ]] || die "no worker reported its jax version"
  versions="$(awk '{print $4}' <<<"$lines" | sort -u)"
  commits="$(awk '{print $3}' <<<"$lines" | sort -u)"
  counts="$(awk '{print $5}' <<<"$lines" | sort -u)"
  echo "workers: $(wc -l <<<"$lines"), jax: $(tr '\n' ' ' <<<"$versions"), devices: $(tr '\n' ' ' <<<"$counts")"
  [[ "$versions" == "$jax_version" ]] || die "jax versions differ from the pinned $jax_version: $versions"
  [[ "$(wc -l <<<"$commits")" == 1 ]] || die "workers have different commits: $commits"
  [[ "$(wc -l <<<"$counts")" == 1 ]] || die "workers see different device counts: $counts"
  echo "setup OK: every worker has jax $jax_version and $commits"
}

cmd_train() {
  require "$CONFIG" "--config (or ADVPROP_CONFIG), e.g. configs/efficientnet.py:b0"
  require "$WORKDIR" "--workdir (or ADVPROP_WORKDIR), e.g. gs://BUCKET/advprop/b0"
  if [[ "$WORKDIR" != gs://* ]]; then
    echo "launch_tpu.sh: warning: --workdir=$WORKDIR is not on GCS; on a multi-host slice every host must" \
         "see the same workdir (checkpoints are written by all processes)" >&2
  fi
  local ts log trainer remote
  ts="$(date -u +%Y%m%d_%H%M%S)"
  log="advprop_logs/train_${ts}.log"
  trainer="$(quote_all .venv/bin/python -m advprop_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
             "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}")"

  # 1. No stale trainer may hold the TPU or join the new job's collectives.
  remote_ssh all "$(kill_training_cmd)"
  # 2. The same command on every worker, started together: the processes find each other through
  #    jax.distributed.initialize() and form one job.
  remote="mkdir -p ~/advprop_logs && cd $(quote_all "$REPO_DIR") && "
  remote+="ln -sfn ~/$log ~/advprop_logs/latest.log && "
  remote+="echo \"\$(hostname) commit=\$(cat .advprop_commit 2>/dev/null) log=~/$log\" && "
  remote+="nohup $trainer > ~/$log 2>&1 < /dev/null &"
  remote_ssh all "$remote"
  local started="started on all workers"
  [[ "$DRY_RUN" == 1 ]] && started="dry run: would start on all workers"  # nothing was started
  echo "$started; log: ~/$log (follow: $0 logs --name=$NAME --zone=$ZONE --follow)" >&2
}

cmd_status() {
  local n="${LINES:-5}" remote
  remote="echo \"== \$(hostname)\"; "
  remote+="pgrep -af '$TRAIN_PATTERN' || echo 'no training process'; "
  remote+="tail -n $n ~/advprop_logs/latest.log 2>/dev/null || echo 'no log yet'"
  remote_ssh all "$remote"
}

cmd_logs() {
  local n="${LINES:-100}" flag=""
  [[ "$FOLLOW" == 1 ]] && flag="-F "
  remote_ssh "$WORKER" "tail ${flag}-n $n ~/advprop_logs/latest.log"
}

cmd_stop() {
  remote_ssh all "$(kill_training_cmd)"
}

cmd_delete() {
  if [[ "$YES" != 1 && "$DRY_RUN" != 1 ]]; then
    local answer=""
    read -r -p "Delete TPU VM '$NAME' in $ZONE? Local disks of all workers are lost. [y/N] " answer || true
    [[ "$answer" == y || "$answer" == Y || "$answer" == yes ]] || die "not deleted (pass --yes to skip the question)"
  fi
  if [[ "$MULTISLICE" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_COMMON[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_COMMON[@]}" --quiet
  fi
}

if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found (install the Google Cloud SDK, or use --dry-run to see the commands)"
fi

"cmd_$CMD"
