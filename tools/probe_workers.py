"""Times every stage of `train_iterator` with grain worker processes and device prefetch onto fake CPU devices
(the evidence of issue 21's e2e stall).

    python tools/probe_workers.py PREPARED_DIR WORKERS BATCHES DEVICES LOG_DIR   (from the project root)
    python tools/probe_workers.py --summary LOG_DIR

PREPARED_DIR is a `siim-jax prepare` folder at 512² (e.g. the benchmark's /tmp/siim_jax_bench/prepared-128).

Workers log (JSON lines, LOG_DIR/worker-I.jsonl, wall-clock time.time()): process start (from /proc), worker_init
call, cost of the imports the dataset's unpickling needs, first element start/end, every 16th element, and whether
jax has a backend, its plugins discovered, or TF / torch imported. The parent logs each batch leaving grain
(to_device entry), its device_put end, and the consumer's receipt.
"""
import faulthandler
import glob
import json
import os
import sys
import time

if sys.argv[1] != "--summary":
    PREPARED, WORKERS, BATCHES, DEVICES, LOG_DIR = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"


def _proc_age_s() -> tuple[float, float]:
    """(process start as time.time(), CPU seconds used so far) from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    start_ticks, utime, stime = int(fields[19]), int(fields[11]), int(fields[12])
    uptime = float(open("/proc/uptime").read().split()[0])
    return time.time() - (uptime - start_ticks / ticks), (utime + stime) / ticks


def _state() -> dict:
    mods = sys.modules
    names = ("jax", "jaxlib", "tensorflow", "torch", "tensorflow_datasets", "albumentations", "jax_plugins",
             "jax_cuda13_plugin", "jax_cuda12_plugin")
    state = {name: mods.get(name) is not None for name in names}
    if "jax" in mods:
        from jax._src import xla_bridge
        state["jax_backends"] = sorted(xla_bridge._backends)
        state["jax_plugins_discovered"] = bool(xla_bridge._plugins_registered)
        import jax
        state["jax_platforms"] = jax.config.jax_platforms
    state["env_JAX_PLATFORMS"] = os.environ.get("JAX_PLATFORMS")
    return state


def probe_init(worker_index: int, worker_count: int) -> None:
    from siim_jax.data.pipeline import _init_worker as original_init

    log = open(f"{LOG_DIR}/worker-{worker_index}.jsonl", "a", buffering=1)

    def write(event, **extra):
        started, cpu = _proc_age_s()
        log.write(json.dumps({"event": event, "t": time.time(), "proc_start": started, "cpu_s": cpu,
                              "pid": os.getpid(), **extra}) + "\n")

    original_init(worker_index, worker_count)
    write("init", **_state())
    for module in ("jax", "tensorflow_datasets", "siim_jax.data.pipeline"):  # what unpickling the dataset imports
        t = time.perf_counter()
        __import__(module)
        write("imported", module=module, seconds=time.perf_counter() - t)
    from siim_jax.data import pipeline

    original = pipeline._LoadElement.map
    count = [0]

    def timed_map(self, item):
        if count[0] == 0:
            write("first_element_start", **_state())
        result = original(self, item)
        count[0] += 1
        if count[0] == 1 or count[0] % 16 == 0:
            write("element_done", n=count[0], **_state())
        return result

    pipeline._LoadElement.map = timed_map


def main():
    import jax
    from siim_jax.configs import defaults

    from siim_jax import sharding as sharding_lib
    from siim_jax.data import pipeline

    os.makedirs(LOG_DIR, exist_ok=True)
    parent = open(f"{LOG_DIR}/parent.jsonl", "w", buffering=1)

    def write(event, **extra):
        parent.write(json.dumps({"event": event, "t": time.time(), **extra}) + "\n")

    config = defaults.default_data_config()
    config.update({"prepared_dir": PREPARED, "image_size": 512, "workers": WORKERS})
    config.balance.mode = "none"
    frame = pipeline.build_datasets(config).train
    pipeline._init_worker = probe_init  # cloudpickled by value (defined in __main__)
    original_to_device = pipeline.to_device

    def timed_to_device(batch, sharding):
        write("from_grain")
        out = original_to_device(batch, sharding)
        jax.block_until_ready(out)
        write("device_put_done")
        return out

    pipeline.to_device = timed_to_device
    sharding = sharding_lib.batch_sharding(sharding_lib.data_mesh())
    write("start", devices=len(jax.devices()), cpus=len(os.sched_getaffinity(0)))
    epochs = range(60)
    if os.environ.get("DUMP_EVERY_S"):  # the parent's thread stacks, to see which worker's start is pending
        faulthandler.dump_traceback_later(float(os.environ["DUMP_EVERY_S"]), repeat=True,
                                          file=open(f"{LOG_DIR}/stacks.txt", "w"))
    it = pipeline.train_iterator(config, frame, epochs, 32, sharding=sharding)
    for i in range(BATCHES):
        next(it)
        write("batch", n=i)
    it.close()
    write("closed")


def summary(folder: str) -> None:
    """Per-worker stage times, in seconds after the parent created the iterator."""
    parent = [json.loads(line) for line in open(f"{folder}/parent.jsonl")]
    t0 = next(e["t"] for e in parent if e["event"] == "start")
    print(f"parent start: {parent[0]}")
    print("worker  spawned  init  [cpu]  imports jax/tfds/pipeline (s)   1st elem start  1st done  [cpu]  "
          "backends  plugins  tf  torch")
    for path in sorted(glob.glob(f"{folder}/worker-*.jsonl"), key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0])):
        events = [json.loads(line) for line in open(path)]
        by = {}
        for e in events:
            by.setdefault(e["event"], []).append(e)
        init, first, done = by["init"][0], by.get("first_element_start", [None])[0], by.get("element_done", [None])[0]
        imports = "/".join(f"{e['seconds']:.1f}" for e in by["imported"])
        last = events[-1]
        fmt = lambda e, k="t": "-" if e is None else f"{e[k] - t0:6.1f}"  # noqa: E731
        print(f"{path.rsplit('-', 1)[1].split('.')[0]:>6}  {init['proc_start'] - t0:7.1f}  {fmt(init)}  "
              f"[{init['cpu_s']:.1f}]  {imports:>28}   {fmt(first):>14}  {fmt(done):>8}  "
              f"[{'-' if done is None else round(done['cpu_s'], 1)}]  {last.get('jax_backends')}  "
              f"{last.get('jax_plugins_discovered')}  {last.get('tensorflow')}  {last.get('torch')}")
    batches = [e["t"] - t0 for e in parent if e["event"] == "batch"]
    grain = [e["t"] - t0 for e in parent if e["event"] == "from_grain"]
    puts = [e["t"] - t0 for e in parent if e["event"] == "device_put_done"]
    print(f"first batch from grain {grain[0]:.1f} s, on device {puts[0]:.1f} s, to consumer {batches[0]:.1f} s")
    marks = {i: round(b, 1) for i, b in enumerate(batches) if i in (0, 1, 2, 5, 10, 15, 20, 30, 40, 60, 80, 99)}
    print(f"consumer batch times: {marks}")
    half = len(batches) // 2
    if len(batches) > 4:
        print(f"second-half rate: {32 * (len(batches) - half) / (batches[-1] - batches[half - 1]):.0f} img/s")


if __name__ == "__main__":
    summary(sys.argv[2]) if sys.argv[1] == "--summary" else main()
