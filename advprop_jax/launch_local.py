"""Runs one multi-host training job as N local processes (the multi-host code path, on one machine).

  python -m advprop_jax.launch_local --processes=2 [--devices_per_process=1] -- \\
      --config=configs/demo.py --workdir=workdirs/demo2

Starts `python -m advprop_jax.main <args> --distributed=yes --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=I` for I = 0..N-1, each with its own CPU devices (JAX_NUM_CPU_DEVICES),
over JAX's CPU collectives: per-process input shards, every process in checkpointing, process 0 writing,
exactly as on a pod. Output lines are prefixed with [process I]. When one process fails, the others are
stopped and the launcher exits with its exit code; Ctrl-C reaches every process (each saves and exits).
"""
import os
import signal
import socket
import subprocess
import sys
import threading

from absl import flags

from advprop_jax import cli

GRACE_SECONDS = 30  # after one process fails, how long the others get to exit before they are killed


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


def _relay(index, stream):
  for line in iter(stream.readline, ''):
    sys.stdout.write(f'[process {index}] {line}')
    sys.stdout.flush()


def launch(trainer_args, processes: int, devices_per_process: int = 1, port: int = 0) -> int:
  """Runs the job; returns the exit code (0 when every process succeeded, else the first failure's)."""
  port = port or free_port()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices_per_process), JAX_PLATFORMS='cpu')
  children = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for cmd in commands(trainer_args, processes, port)]
  relays = [threading.Thread(target=_relay, args=(i, p.stdout), daemon=True)
            for i, p in enumerate(children)]
  for t in relays:
    t.start()
  previous = signal.signal(signal.SIGINT, lambda *_: [p.send_signal(signal.SIGINT) for p in children])
  try:
    code = 0
    remaining = list(children)
    while remaining:
      done = _wait_any(remaining)
      remaining.remove(done)
      if done.returncode and not code:
        code = done.returncode
        print(f'[launch_local] process {children.index(done)} exited with code {code}; stopping the '
              'others', file=sys.stderr)
        for p in remaining:
          p.terminate()
        for p in remaining:
          try:
            p.wait(GRACE_SECONDS)
          except subprocess.TimeoutExpired:
            p.kill()
    return code
  finally:
    signal.signal(signal.SIGINT, previous)
    for t in relays:
      t.join(timeout=5)


def _wait_any(processes):
  while True:
    for p in processes:
      if p.poll() is not None:
        return p
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
