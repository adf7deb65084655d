"""Runs one multi-host training job as N local processes (the multi-host code path, on one machine).

  python -m advprop_jax.launch_local --processes=2 [--devices_per_process=1] -- \\
      --config=configs/demo.py --workdir=workdirs/demo2

Starts `python -m advprop_jax.main <args> --distributed=yes --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I` for I = 0..N-1, each with its own CPU devices (JAX_NUM_CPU_DEVICES),
over JAX's CPU collectives: per-process input shards, every process in checkpointing, process 0 writing,
exactly as on a pod. Output lines are prefixed with [process I]. When one process fails, the others are
stopped and the launcher exits with its exit code. `--process_is_slice` among the trainer's flags
makes each process one slice of a multislice job (the mesh's slice axis; docs/tpu.md, "multislice").

Signals: SIGTERM, SIGINT (Ctrl-C) and SIGHUP (terminal closed) to the launcher are forwarded to
every process; they agree on a step, save a checkpoint there and exit. The launcher waits for them
(killing them after STOP_GRACE_SECONDS) and says so in one line. A second Ctrl-C stops them at once.
The processes run in their own process group (a Ctrl-C in the terminal reaches them once, through
the launcher) and, on Linux, get SIGTERM from the kernel when the launcher dies however it dies
(SIGKILL included): they save and exit, so no orphan keeps training or holds the workdir.
"""
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import flags

from advprop_jax import cli

GRACE_SECONDS = 30  # after one process fails, how long the others get to exit before they are killed
STOP_GRACE_SECONDS = 300  # after a forwarded signal, how long the processes get to save and exit
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def define_flags(flag_values: flags.FlagValues) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_integer('processes', 2, 'Number of processes (>= 1).', **fv)
  flags.DEFINE_integer('devices_per_process', 1, 'CPU devices of each process (JAX_NUM_CPU_DEVICES).', **fv)
  flags.DEFINE_integer('port', 0, 'Coordinator port on 127.0.0.1 (0: a free one).', **fv)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def commands(trainer_args, processes: int, port: int):
  """The command line of each process."""
  return [[sys.executable, '-m', 'advprop_jax.main', *trainer_args, '--distributed=yes',
           f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
           f'--process_id={i}'] for i in range(processes)]


def _die_with_parent_fn():
  """A preexec_fn: the kernel sends the child SIGTERM when the launcher dies (Linux); else None.

  SIGTERM, not SIGKILL: the processes then save a checkpoint and exit, as on a forwarded signal.
  libc is loaded here, before fork: the child between fork and exec must only call into it.
  """
  if not sys.platform.startswith('linux'):
    return None
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  launcher = os.getpid()

  def die_with_parent():
    prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != launcher:  # the launcher died before prctl: no signal would come
      os._exit(1)  # pylint: disable=protected-access
  return die_with_parent


def _relay(index, stream):
  writable = True
  for line in iter(stream.readline, ''):
    if not writable:
      continue  # keep draining: a child blocked on a full pipe could not save and exit
    try:
      sys.stdout.write(f'[process {index}] {line}')
      sys.stdout.flush()
    except (OSError, ValueError):  # the terminal is gone (SIGHUP) or stdout was closed
      writable = False


def _say(message: str) -> None:
  try:
    print(f'[launch_local] {message}', file=sys.stderr, flush=True)
  except (OSError, ValueError):
    pass


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128 + N


class _Stop:
  """The launcher's SIGTERM / SIGINT / SIGHUP handler: forwards the signal to every live process."""

  def __init__(self, children):
    self.children, self.signum, self.deadline = children, None, None

  def __call__(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    alive = [p for p in self.children if p.poll() is None]
    for p in alive:
      try:
        p.send_signal(signum)
      except ProcessLookupError:
        pass
    if self.signum is None:
      self.deadline = time.monotonic() + STOP_GRACE_SECONDS
      _say(f'{name}: forwarded to the {len(alive)} running process(es); waiting for them to save a '
           f'checkpoint and exit (up to {STOP_GRACE_SECONDS} s)' +
           (' - Ctrl-C again stops them at once, without saving'
            if signum == signal.SIGINT else ''))
    else:
      _say(f'{name} again: forwarded to the {len(alive)} running process(es)')
    self.signum = signum


def launch(trainer_args, processes: int, devices_per_process: int = 1, port: int = 0) -> int:
  """Runs the job; returns the exit code (0 when every process succeeded, else the first failure's)."""
  port = port or free_port()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices_per_process), JAX_PLATFORMS='cpu')
  stop = _Stop([])
  # Handlers first, so that a signal during start-up is not the default death of the launcher alone.
  previous = {sig: signal.signal(sig, stop) for sig in FORWARDED}
  try:
    for cmd in commands(trainer_args, processes, port):
      if stop.signum is not None:
        break  # stopped while starting: start no more
      # Own process group: a Ctrl-C in the terminal reaches the processes once, through the launcher
      # (twice would mean 'stop at once, without saving').
      stop.children.append(subprocess.Popen(
          cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
          process_group=0, preexec_fn=_die_with_parent_fn()))
    return _supervise(stop)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _supervise(stop) -> int:
  children = stop.children
  if not children:  # stopped before the first process started
    return 128 + stop.signum
  if stop.signum is not None:  # a signal came while they were starting: they get it now
    for p in children:
      p.send_signal(stop.signum)
  relays = [threading.Thread(target=_relay, args=(i, p.stdout), daemon=True)
            for i, p in enumerate(children)]
  for t in relays:
    t.start()
  code = 0
  remaining = list(children)
  while remaining:
    done = _wait_any(remaining, lambda: stop.deadline)
    if done is None:  # the grace period after a forwarded signal ran out
      _say(f'process(es) {[children.index(p) for p in remaining]} did not exit within '
           f'{STOP_GRACE_SECONDS} s of {signal.Signals(stop.signum).name}; killing them')
      for p in remaining:
        p.kill()
        p.wait()
      code = code or 128 + signal.SIGKILL
      break
    remaining.remove(done)
    if done.returncode and not code:
      code = _exit_code(done.returncode)
      if remaining:
        _say(f'process {children.index(done)} exited with code {code}; stopping the others')
      for p in remaining:
        p.terminate()
      for p in remaining:
        try:
          p.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
          p.kill()
  for t in relays:
    t.join(timeout=5)
  if stop.signum is not None:
    name = signal.Signals(stop.signum).name
    _say(f'stopped by {name}: ' + ('every process saved a checkpoint and exited; rerun the same '
                                   'command to resume' if code == 0 else f'exit code {code}'))
  return code


def _wait_any(processes, deadline):
  """The first of `processes` to exit, or None once deadline() (time.monotonic) has passed."""
  while True:
    for p in processes:
      if p.poll() is not None:
        return p
    if deadline() is not None and time.monotonic() > deadline():
      return None
    try:
      processes[0].wait(0.2)
    except subprocess.TimeoutExpired:
      pass


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  trainer_args = argv[1:]
  if flag_values.processes < 1 or flag_values.devices_per_process < 1:
    cli.fail(f'--processes={flag_values.processes} and --devices_per_process='
             f'{flag_values.devices_per_process} must be >= 1')
  if not trainer_args:
    cli.fail('give the trainer\'s flags after --, e.g. -- --config=configs/demo.py --workdir=DIR')
  sys.exit(launch(trainer_args, flag_values.processes, flag_values.devices_per_process, flag_values.port))


def run():
  cli.run(main, 'advprop_jax.launch_local', __doc__, define_flags)


if __name__ == '__main__':
  run()
