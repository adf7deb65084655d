"""launch_local's signal handling with stand-in processes (seconds, no JAX): SIGTERM / SIGINT / SIGHUP
are forwarded once to every process and waited for, a Ctrl-C to the terminal's process group reaches
each process once, the kernel stops the processes when the launcher is SIGKILLed, and processes that do
not exit are killed after the grace period. tests/test_multihost.py runs the same with real trainers."""
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for one trainer: records the stop signals it gets (in $OUT/<pid>), exits 0 after the
# first one (unless IGNORE is set), a little later so that a second copy would be recorded too.
CHILD = """
import os, signal, sys, time
got = []
def record(n, f):
  got.append(signal.Signals(n).name)
  with open(os.path.join(os.environ['OUT'], str(os.getpid())), 'w') as fh:
    fh.write(' '.join(got))
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
  signal.signal(s, signal.SIG_IGN if os.environ.get('IGNORE') else record)
print(f'child {os.getpid()} pgid {os.getpgid(0)}', flush=True)
while not got:
  time.sleep(0.05)
time.sleep(0.5)
print('child got', ' '.join(got), flush=True)
"""

DRIVER = """
import sys
from advprop_jax import launch_local
launch_local.STOP_GRACE_SECONDS = float(sys.argv[2])
launch_local.commands = lambda args, n, port: [[sys.executable, '-c', sys.argv[1]]] * n
sys.exit(launch_local.launch([], 2))
"""


def start(tmp_path, grace=60, **env):
  """The launcher with two stand-ins, once both run; returns (launcher, [(pid, pgid)], lines)."""
  launcher = subprocess.Popen(
      [sys.executable, '-c', DRIVER, CHILD, str(grace)], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, start_new_session=True,
      env=dict(os.environ, OUT=str(tmp_path), PYTHONPATH=REPO, **env))
  children, lines = [], []
  for line in launcher.stdout:
    lines.append(line)
    if line.startswith('[process') and ' child ' in line:
      children.append(tuple(int(w) for w in line.split()[3::2]))
      if len(children) == 2:
        return launcher, children, lines
  raise AssertionError(''.join(lines))


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f'/proc/{pid}/stat') as f:  # a zombie (exited, not yet reaped) is not alive
    return f.read().rsplit(')', 1)[1].split()[0] != 'Z'


def stop_all(launcher, children):
  for pid in [launcher.pid] + [pid for pid, _ in children]:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


@pytest.mark.parametrize('sig,to_group', [(signal.SIGTERM, False), (signal.SIGINT, False),
                                          (signal.SIGHUP, False), (signal.SIGINT, True)],
                         ids=['SIGTERM', 'SIGINT', 'SIGHUP', 'ctrl-c-in-the-terminal'])
def test_a_signal_is_forwarded_once_and_waited_for(tmp_path, sig, to_group):
  launcher, children, lines = start(tmp_path)
  try:
    assert all(pgid != launcher.pid for _, pgid in children)  # not in the terminal's group
    if to_group:  # Ctrl-C in a terminal: the whole foreground process group gets SIGINT
      os.killpg(launcher.pid, sig)
    else:
      launcher.send_signal(sig)
    out, _ = launcher.communicate(timeout=30)
  finally:
    stop_all(launcher, children)
  lines.append(out)
  name = signal.Signals(sig).name
  assert launcher.returncode == 0, ''.join(lines)
  for pid, _ in children:
    assert (tmp_path / str(pid)).read_text() == name  # exactly once each
  said = [line for line in ''.join(lines).splitlines() if line.startswith('[launch_local]')]
  assert len(said) == 2 and said[0].startswith(f'[launch_local] {name}: forwarded to the 2 '), said
  assert said[1].startswith(f'[launch_local] stopped by {name}: every process saved'), said


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux only')
def test_processes_stop_when_the_launcher_is_killed(tmp_path):
  launcher, children, _ = start(tmp_path)
  try:
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 20
    while any(alive(pid) for pid, _ in children) and time.time() < deadline:
      time.sleep(0.1)
    assert not any(alive(pid) for pid, _ in children)
  finally:
    stop_all(launcher, children)
  for pid, _ in children:
    # SIGTERM, the trainers' cue to save and exit; possibly more than once: the kernel sends the
    # death signal at each reparenting, also from one dying thread of the launcher to another.
    assert set((tmp_path / str(pid)).read_text().split()) == {'SIGTERM'}


def test_processes_that_do_not_exit_are_killed_after_the_grace_period(tmp_path):
  launcher, children, lines = start(tmp_path, grace=1, IGNORE='1')
  try:
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=30)
    assert not any(alive(pid) for pid, _ in children)
  finally:
    stop_all(launcher, children)
  assert launcher.returncode == 128 + signal.SIGKILL, ''.join(lines) + out
  assert 'did not exit within 1' in out and 'killing them' in out
