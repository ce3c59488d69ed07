"""The worker with a store that has predictors and a policy: ranking in-process
(predictor pulled from the Ranker service) and by a Rank RPC per layer give the
same tokens as ``m2cache run`` with the store's default policy."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from m2cache.store.reader import NeuronStore
from m2cache.ranker import server as ranker_server
from m2cache.ranker.config import RankerConfig
from m2cache.predictors.storage import save_policy, save_predictor
from worker_stack import RATIOS, WorkerHandle, random_predictor

PROMPT = [1, 365, 118, 263, 431]


@pytest.fixture(scope="module")
def policy_root(store_root, tmp_path_factory):
    """A store root holding a copy of stories260k with a predictor and a policy."""
    root = tmp_path_factory.mktemp("policy-root")
    shutil.copytree(store_root / "stories260k", root / "stories260k")
    store = NeuronStore(root / "stories260k")
    version = save_predictor(store, random_predictor(store, seed=3))
    save_policy(store, {"ratios": RATIOS.to_dict(), "predictor_version": version, "budget": 0.3})
    store.close()
    return root


@pytest.fixture(scope="module")
def services(policy_root):
    from tiers import DramHandle, StoreHandle, start_redis

    store = StoreHandle(policy_root)
    redis = start_redis()
    dram = DramHandle(store.target, redis.url, budget_bytes=1 << 20)
    ranker, port, catalog = ranker_server.create_server(RankerConfig(root=policy_root, address="127.0.0.1:0"))
    ranker.start()
    yield dram, f"127.0.0.1:{port}"
    ranker.stop(0).wait()
    dram.stop()
    redis.stop()
    store.stop()


def run_cli_ids(policy_root, n: int) -> list[int]:
    res = subprocess.run([sys.executable, "-m", "m2cache.cli", "run", str(policy_root / "stories260k"),
                          "--prompt", "x", "--max-new-tokens", str(n), "--token-ids"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_local_and_remote_ranking_match_run(services, policy_root):
    dram, ranker = services
    results, speeds = {}, {}
    for mode in ("local", "remote"):
        worker = WorkerHandle(dram.target, "stories260k", ranker_target=ranker, rank_mode=mode, cache_fraction=0.25)
        try:
            prompt = worker.runtime.encode("x")
            t0 = time.perf_counter()
            results[mode], stats = worker.generate(prompt, 24)
            speeds[mode] = 24 / (time.perf_counter() - t0)
            assert worker.runtime.choosers.ratios == RATIOS.to_dict()
        finally:
            worker.stop()
    print(f"\ntokens/s, in-process ranking {speeds['local']:.1f} vs Rank RPC {speeds['remote']:.1f}")
    want = run_cli_ids(policy_root, 24)
    assert prompt + results["local"] == want
    assert results["remote"] == results["local"]


def test_policy_without_ranker_is_a_clear_startup_error(services):
    dram, _ranker = services
    with pytest.raises(Exception, match="needs --ranker-target"):
        WorkerHandle(dram.target, "stories260k")
