"""launch_tpu.sh: the gcloud commands it would run (--dry-run), its option errors, and its shell syntax.

No gcloud and no network needed: every case runs the script with --dry-run, which prints each command
(shell-quoted, one per line, prefixed with '+ ') instead of running it.
"""
import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'launch_tpu.sh')
BASE = ['--name=ap-b0', '--zone=us-central2-b', '--dry-run']
CONFIG = 'configs/efficientnet.py:b0'
WORKDIR = 'gs://my-bucket/advprop/b0'


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith('ADVPROP_')}
  env['PATH'] = os.environ.get('PATH', '/usr/bin:/bin')
  return env


def run_script(*args, check=True):
  proc = subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, env=_env(),
                        stdin=subprocess.DEVNULL, timeout=30)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def commands(*args):
  """The printed commands, each as an argv list."""
  proc = run_script(*args)
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert lines and all(l.startswith('+ ') for l in lines), proc.stdout
  return [shlex.split(l[2:]) for l in lines]


def gcloud(cmds):
  return [c for c in cmds if c[0] == 'gcloud']


def flag(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(name + '=')]
  assert len(values) == 1, (name, argv)
  return values[0]


def pinned_jax():
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    return re.search(r'^jax==(\S+)', f.read(), re.M).group(1)


# ---------------------------------------------------------------------------------------------------------
# Shell syntax and lint
# ---------------------------------------------------------------------------------------------------------
def test_bash_syntax():
  proc = subprocess.run(['bash', '-n', SCRIPT], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def test_shellcheck():
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed: only `bash -n` was checked (apt-get install shellcheck)')
  proc = subprocess.run(['shellcheck', SCRIPT], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------
# create
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('accelerator,version', [
    ('v4-8', 'tpu-ubuntu2204-base'),
    ('v4-32', 'tpu-ubuntu2204-base'),
    ('v4-128', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-8', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e'),
])
def test_create_picks_runtime_version(accelerator, version):
  [cmd] = commands('create', *BASE, f'--accelerator={accelerator}')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'ap-b0']
  assert flag(cmd, '--zone') == 'us-central2-b'
  assert flag(cmd, '--accelerator-type') == accelerator
  assert flag(cmd, '--version') == version
  assert '--spot' not in cmd and '--preemptible' not in cmd


def test_create_options():
  [cmd] = commands('create', *BASE, '--accelerator', 'v4-32', '--version', 'custom-rt', '--spot',
                   '--project=my-proj')
  assert flag(cmd, '--version') == 'custom-rt'
  assert flag(cmd, '--project') == 'my-proj'
  assert '--spot' in cmd
  [cmd] = commands('create', *BASE, '--accelerator=v4-32', '--preemptible')
  assert '--preemptible' in cmd


def test_create_unknown_accelerator_needs_version():
  proc = run_script('create', *BASE, '--accelerator=x9-4', check=False)
  assert proc.returncode == 2 and '--version' in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, '.git')),
                    reason='setup ships the git HEAD: needs a git checkout')
def test_setup_same_code_and_pinned_versions_on_all_workers():
  cmds = commands('setup', *BASE)
  remote = gcloud(cmds)
  # Every remote step targets all workers.
  assert all(flag(c, '--worker') == 'all' for c in remote)
  scp = [c for c in remote if c[4] == 'scp']
  assert len(scp) == 1 and scp[0][5].endswith('.tar.gz')
  ssh = [flag(c, '--command') for c in remote if c[4] == 'ssh']
  assert len(ssh) == 3  # unpack code, install, version check
  install = shlex.split(ssh[1].replace(';', ' ; '))
  assert '-r' in install and install[install.index('-r') + 1] == 'requirements.txt'
  jax_tpu = [a for a in install if a.startswith('jax[tpu]')]
  assert jax_tpu == [f'jax[tpu]=={pinned_jax()}']
  assert 'https://storage.googleapis.com/jax-releases/libtpu_releases.html' in install
  # One install resolves requirements.txt and jax[tpu] together, into the repo's venv.
  assert '.venv/bin/python' in install
  check = ssh[2]
  assert 'import jax; print(jax.__version__, jax.device_count())' in check
  # The shipped archive is this checkout's HEAD.
  [archive] = [c for c in cmds if c[0] == 'git']
  assert 'archive' in archive and archive[-1] == 'HEAD'


def test_setup_git_clone_at_commit():
  cmds = gcloud(commands('setup', *BASE, '--git-url=https://example.com/advprop_jax.git',
                         '--commit=0123abcd', '--repo-dir=src/ap'))
  assert not [c for c in cmds if c[4] == 'scp']
  clone = flag(cmds[0], '--command')
  assert 'git clone --quiet https://example.com/advprop_jax.git src/ap' in clone
  assert 'checkout --quiet --detach 0123abcd' in clone
  assert all(flag(c, '--worker') == 'all' for c in cmds)
  assert all('cd src/ap' in flag(c, '--command') for c in cmds[1:])


def test_setup_git_url_requires_commit():
  proc = run_script('setup', *BASE, '--git-url=https://example.com/x.git', check=False)
  assert proc.returncode == 2 and '--commit' in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# train / status / logs / stop / delete
# ---------------------------------------------------------------------------------------------------------
def _trainer_argv(remote_cmd):
  """The argv of the trainer inside the remote command line of `train`."""
  words = shlex.split(remote_cmd)
  start = words.index('nohup') + 1
  end = words.index('>', start)
  return words[start:end]


def test_train_kills_stale_then_starts_same_command_everywhere():
  cmds = commands('train', *BASE, f'--config={CONFIG}', f'--workdir={WORKDIR}', '--',
                  '--config.data.data_dir=gs://my-bucket/tensorflow_datasets',
                  '--config.method=advprop', '--config.note=two words')
  assert len(cmds) == 2 and all(c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'] for c in cmds)
  assert all(flag(c, '--worker') == 'all' for c in cmds)
  kill, train = (flag(c, '--command') for c in cmds)
  # The kill step comes first and does not match its own shell (bracketed pattern).
  assert 'pkill' in kill and '[a]dvprop_jax[.]main' in kill and 'advprop_jax.main' not in kill
  assert 'nohup' not in kill
  assert train.startswith('mkdir -p ~/advprop_logs && cd advprop_jax && ')
  assert train.rstrip().endswith('&')
  argv = _trainer_argv(train)
  assert argv == ['.venv/bin/python', '-m', 'advprop_jax.main', f'--config={CONFIG}',
                  f'--workdir={WORKDIR}', '--config.data.data_dir=gs://my-bucket/tensorflow_datasets',
                  '--config.method=advprop', '--config.note=two words']
  log = shlex.split(train)[shlex.split(train).index('>') + 1]
  assert re.fullmatch(r'~/advprop_logs/train_\d{8}_\d{6}\.log', log)
  assert '< /dev/null' in train and '2>&1' in train


def test_train_warns_on_local_workdir():
  proc = run_script('train', *BASE, f'--config={CONFIG}', '--workdir=/tmp/wd')
  assert 'not on GCS' in proc.stderr


def test_train_dry_run_says_it_would_start():  # issue #29: a dry run starts nothing
  proc = run_script('train', *BASE, f'--config={CONFIG}', f'--workdir={WORKDIR}')
  assert 'dry run: would start on all workers' in proc.stderr and 'started' not in proc.stderr


def test_status_all_workers():
  [cmd] = commands('status', *BASE, '--lines=7')
  assert flag(cmd, '--worker') == 'all'
  remote = flag(cmd, '--command')
  assert 'pgrep' in remote and 'tail -n 7 ~/advprop_logs/latest.log' in remote


def test_logs_worker_selection():
  [cmd] = commands('logs', *BASE)
  assert flag(cmd, '--worker') == '0'
  assert flag(cmd, '--command') == 'tail -n 100 ~/advprop_logs/latest.log'
  [cmd] = commands('logs', *BASE, '--worker=3', '--follow')
  assert flag(cmd, '--worker') == '3'
  assert flag(cmd, '--command').startswith('tail -F ')


def test_stop_all_workers():
  [cmd] = commands('stop', *BASE)
  assert flag(cmd, '--worker') == 'all'
  assert 'pkill -TERM' in flag(cmd, '--command') and 'pkill -KILL' in flag(cmd, '--command')


def test_delete():
  [cmd] = commands('delete', *BASE, '--yes')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'ap-b0'] and '--quiet' in cmd
  # Without --yes and without an answer (stdin closed) nothing is deleted.
  proc = run_script('delete', '--name=ap-b0', '--zone=z', check=False)
  assert proc.returncode != 0 and 'not deleted' in proc.stderr


def test_env_defaults():
  env = _env()
  env.update(ADVPROP_TPU_NAME='env-tpu', ADVPROP_TPU_ZONE='europe-west4-a')
  proc = subprocess.run(['bash', SCRIPT, 'stop', '--dry-run'], capture_output=True, text=True, env=env)
  assert proc.returncode == 0, proc.stderr
  cmd = shlex.split(proc.stdout.strip()[2:])
  assert cmd[5] == 'env-tpu' and flag(cmd, '--zone') == 'europe-west4-a'


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('args,option', [
    (['create', '--zone=z', '--accelerator=v4-8', '--dry-run'], '--name'),
    (['create', '--name=n', '--accelerator=v4-8', '--dry-run'], '--zone'),
    (['create', '--name=n', '--zone=z', '--dry-run'], '--accelerator'),
    (['setup', '--name=n', '--dry-run'], '--zone'),
    (['train', '--name=n', '--zone=z', f'--workdir={WORKDIR}', '--dry-run'], '--config'),
    (['train', '--name=n', '--zone=z', f'--config={CONFIG}', '--dry-run'], '--workdir'),
    (['status', '--zone=z', '--dry-run'], '--name'),
    (['logs', '--name=n', '--dry-run'], '--zone'),
    (['stop', '--zone=z', '--dry-run'], '--name'),
    (['delete', '--name=n', '--dry-run'], '--zone'),
])
def test_missing_option_exit_2(args, option):
  proc = run_script(*args, check=False)
  assert proc.returncode == 2, proc.stderr
  assert option in proc.stderr
  assert not proc.stdout.strip()  # nothing was run or printed


@pytest.mark.parametrize('args', [['bogus'], [], ['status', '--name=n', '--zone=z', '--bogus-option']])
def test_usage_errors_exit_2(args):
  proc = run_script(*args, check=False)
  assert proc.returncode == 2
  assert 'error' in proc.stderr


def test_extra_args_only_for_train():
  proc = run_script('stop', *BASE, '--', '--config.x=1', check=False)
  assert proc.returncode == 2


def test_help():
  proc = run_script('--help')
  for word in ('create', 'setup', 'train', 'status', 'logs', 'stop', 'delete', '--dry-run'):
    assert word in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# --dry-run anywhere never runs gcloud (#18: after `--` it went to the trainer and the real gcloud ran)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gcloud(tmp_path):
  """A `gcloud` first on PATH that records every call; returns (env, path of the record)."""
  record = tmp_path / 'gcloud_calls'
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud_path = bin_dir / 'gcloud'
  gcloud_path.write_text(f'#!/usr/bin/env bash\necho "$*" >> {shlex.quote(str(record))}\n')
  gcloud_path.chmod(0o755)
  env = _env()
  env['PATH'] = f'{bin_dir}{os.pathsep}{env["PATH"]}'
  return env, record


def _run_with(env, *args):
  return subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, env=env,
                        stdin=subprocess.DEVNULL, timeout=30)


TRAIN = ['train', '--name=ap-b0', '--zone=us-central2-b', f'--config={CONFIG}', f'--workdir={WORKDIR}']


def test_fake_gcloud_records_a_real_run(fake_gcloud):
  env, record = fake_gcloud
  proc = _run_with(env, *TRAIN, '--', '--config.method=advprop')
  assert proc.returncode == 0, proc.stderr
  calls = record.read_text().splitlines()
  assert len(calls) == 2 and all(c.startswith('compute tpus tpu-vm ssh ap-b0') for c in calls)


@pytest.mark.parametrize('tail', [
    ['--', '--config.method=advprop', '--dry-run'],
    ['--', '--dry-run=yes'],
    ['--', '--dry-run', '--config.method=advprop'],
])
def test_dry_run_after_double_dash_is_a_dry_run(fake_gcloud, tail):
  env, record = fake_gcloud
  proc = _run_with(env, *TRAIN, *tail)
  assert proc.returncode == 0, proc.stderr
  assert not record.exists()  # gcloud never ran
  lines = proc.stdout.splitlines()
  assert len(lines) == 2 and all(l.startswith('+ gcloud compute tpus tpu-vm ssh') for l in lines)
  argv = _trainer_argv(flag(shlex.split(lines[1][2:]), '--command'))
  assert not [a for a in argv if a.startswith('--dry-run')]  # not passed on to the trainer
  assert [a for a in argv if a.startswith('--config.method')] == [a for a in tail if a.startswith('--config.')]
  assert "launcher's dry run" in proc.stderr


@pytest.mark.parametrize('args', [
    [*TRAIN, '--', '--dry_run'],             # a look-alike after --: refused, not passed to the trainer
    [*TRAIN, '--', '--dryrun=1'],
    ['stop', '--name', '--dry-run', '--zone=z'],  # --dry-run where a value was expected
    ['stop', '--name=n', '--zone=z', '--', '--dry-run'],  # trainer args for another command
])
def test_ambiguous_dry_run_exits_2_without_gcloud(fake_gcloud, args):
  env, record = fake_gcloud
  proc = _run_with(env, *args)
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  assert not record.exists()
  assert 'error' in proc.stderr and not proc.stdout.strip()


# --------------------------------------------------------------------------------------------------
# Multislice (#28): --accelerator=NxTYPE is a queued resource of N nodes, driven on every node
# --------------------------------------------------------------------------------------------------
MULTI = [*BASE, '--accelerator=2xv5litepod-16']


def test_multislice_create_is_a_queued_resource_with_a_node_count():
  [cmd] = commands('create', *MULTI, '--spot')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'ap-b0']
  assert flag(cmd, '--accelerator-type') == 'v5litepod-16'  # one slice's type
  assert flag(cmd, '--node-count') == '2' and flag(cmd, '--node-prefix') == 'ap-b0'
  assert flag(cmd, '--runtime-version') == 'v2-alpha-tpuv5-lite' and '--spot' in cmd
  [cmd] = commands('create', *BASE, '--accelerator=4xv4-32')
  assert (flag(cmd, '--node-count') == '4'
          and flag(cmd, '--runtime-version') == 'tpu-ubuntu2204-base')
  [cmd] = commands('create', *BASE, '--accelerator=1xv4-32')  # one slice: a plain TPU VM
  assert cmd[4] == 'create' and cmd[3] == 'tpu-vm' and flag(cmd, '--accelerator-type') == '1xv4-32'


def test_multislice_train_runs_the_same_trainer_on_every_worker_of_every_slice():
  cmds = commands('train', *MULTI, f'--config={CONFIG}', f'--workdir={WORKDIR}', '--',
                  '--config.grad_accumulation_steps=2')
  assert len(cmds) == 2
  for c in cmds:
    assert c[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'ssh', 'ap-b0']
    assert flag(c, '--node') == 'all' and flag(c, '--worker') == 'all'
  kill, train = (flag(c, '--command') for c in cmds)
  assert 'pkill' in kill
  # No multislice flag: jax.distributed and the mesh come up from the platform's
  # MEGASCALE_* settings.
  assert _trainer_argv(train) == ['.venv/bin/python', '-m', 'advprop_jax.main',
                                  f'--config={CONFIG}',
                                  f'--workdir={WORKDIR}', '--config.grad_accumulation_steps=2']


def test_multislice_setup_status_logs_delete_reach_the_nodes():
  cmds = gcloud(commands('setup', *MULTI, '--git-url=https://example.com/x.git', '--commit=abc'))
  assert all(c[3] == 'queued-resources' and flag(c, '--node') == 'all' for c in cmds)
  env = _env()
  env['ADVPROP_TPU_ACCELERATOR'] = '2xv5litepod-16'  # set once, for every command
  proc = subprocess.run(['bash', SCRIPT, 'status', *BASE], capture_output=True, text=True, env=env)
  [cmd] = [shlex.split(l[2:]) for l in proc.stdout.splitlines()]
  assert cmd[3:5] == ['queued-resources', 'ssh'] and flag(cmd, '--node') == 'all'
  [cmd] = commands('logs', *MULTI, '--worker=3')
  assert flag(cmd, '--node') == '0' and flag(cmd, '--worker') == '3'  # the first slice's worker 3
  [cmd] = commands('delete', *MULTI, '--yes')
  assert cmd[3:6] == ['queued-resources', 'delete', 'ap-b0'] and '--force' in cmd


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, '.git')),
                    reason='setup ships the git HEAD: needs a git checkout')
def test_multislice_setup_copies_the_code_to_every_node():
  scp = [c for c in gcloud(commands('setup', *MULTI)) if c[4] == 'scp']
  assert len(scp) == 1 and scp[0][3] == 'queued-resources' and flag(scp[0], '--node') == 'all'
  assert flag(scp[0], '--worker') == 'all' and scp[0][6] == 'ap-b0:advprop_jax_src.tar.gz'


@pytest.mark.parametrize('accelerator', ['0xv4-8', '2x', '2xv3-32', '2xv4-8x', '1.5xv4-8',
                                         '2xtpu7-8'])
def test_malformed_multislice_names_exit_2_before_anything_runs(fake_gcloud, accelerator):
  env, record = fake_gcloud
  proc = _run_with(env, 'stop', '--name=n', '--zone=z', f'--accelerator={accelerator}')
  assert proc.returncode == 2 and not record.exists() and not proc.stdout.strip()
  assert '--accelerator' in proc.stderr.splitlines()[0]


def test_multislice_preemptible_is_refused():
  proc = run_script('create', *MULTI, '--preemptible', check=False)
  assert proc.returncode == 2 and '--spot' in proc.stderr
