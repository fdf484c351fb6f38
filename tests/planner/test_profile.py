"""``strata profile``: a profile of the mock reproduces the mock's timing model (acceptance 1),
the mock replays a profile, the built-in engine's profile loads into the planner, endpoints
are measured over HTTP, and bad files get clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serving.engine.config import EngineConfig
from serving.engine.core import EngineCore
from serving.engine.factory import build_engine
from serving.engine.request import Request, SamplingParams
from serving.engine.scheduler import SchedulerConfig
from serving.engine.timing import MockModelRunner, TimingProfile
from serving.planner.capacity import CapacityModel
from serving.planner.config import SlaConfig
from serving.planner.profile import ProfileError, load_profile
from serving.planner.profiler import ProfilePlan, profile_engine
from workflows.cli import app

NUM_BLOCKS, BLOCK_SIZE = 2048, 16  # 32k tokens of KV: small enough to profile in seconds
PLAN = ProfilePlan(
    prefill_tokens=(16, 32, 64, 128, 256, 512, 1024, 2048),
    batch_sizes=(1, 2, 4, 8, 16, 32),
    context_tokens=(128, 256, 512, 1024, 2048, 4096),
)


def mock_core(profile: TimingProfile | None = None) -> EngineCore:
    return EngineCore(
        MockModelRunner(
            vocab_size=32_000, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, profile=profile
        ),
        SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=2048, max_model_len=16_384),
        enable_prefix_caching=False,
        clock=lambda: 0.0,
    )


@pytest.fixture(scope="module")
def mock_profile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = profile_engine(
        mock_core(), engine="mock", model="mock", device="cpu", vocab_size=32_000, plan=PLAN
    )
    path = tmp_path_factory.mktemp("profile") / "mock.json"
    result.save(path)
    return path


def test_mock_profile_reproduces_the_timing_model_within_10_percent(
    mock_profile_path: Path,
) -> None:
    profile = load_profile(mock_profile_path)
    model = TimingProfile()
    assert (profile.engine, profile.kv_capacity_tokens) == ("mock", NUM_BLOCKS * BLOCK_SIZE)
    for tokens in (16, 100, 300, 777, 1500, 2048):  # on and between the measured points
        measured, formula = profile.prefill_step_s(tokens) * 1000, model.prefill_ms(tokens)
        assert measured == pytest.approx(formula, rel=0.10), tokens
    worst = 0.0
    for batch in (1, 3, 8, 13, 32):
        for context in (128, 200, 700, 1500, 3000):
            blocks = batch * math.ceil((context + 4) / BLOCK_SIZE)
            if blocks > NUM_BLOCKS:
                continue  # the engine cannot hold this batch
            expected = model.decode_ms(blocks / NUM_BLOCKS)
            measured = profile.decode_step_s(batch, context) * 1000
            worst = max(worst, abs(measured - expected) / expected)
    assert worst < 0.10, f"decode grid off by {worst:.1%}"


def test_mock_replays_its_own_profile(mock_profile_path: Path) -> None:
    """The same requests through the default timing model and through the profile: every
    step's time within 10%, the total within 5%."""
    default, replayed = mock_core(), mock_core(TimingProfile.from_json(mock_profile_path))
    for core in (default, replayed):
        for i in range(24):
            prompt = [(7 * i + j) % 32_000 for j in range(200 + 150 * i)]
            params = SamplingParams(max_tokens=40 + 5 * i, ignore_eos=True)
            core.add_request(Request(f"r{i}", prompt, params, eos_token_id=None))
    totals = [0.0, 0.0]
    while default.has_unfinished_requests():
        a, b = default.step().step_duration_s, replayed.step().step_duration_s
        assert b == pytest.approx(a, rel=0.10)
        totals[0] += a
        totals[1] += b
    assert not replayed.has_unfinished_requests()
    assert totals[1] == pytest.approx(totals[0], rel=0.05)


def test_profile_command_writes_a_profile_the_planner_and_mock_load(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.json"
    result = CliRunner().invoke(
        app,
        ["profile", "--model", str(smollm2_dir), "--engine", "mock", "--out", str(out),
         "--num-blocks", "512", "--prefill-lengths", "16,256", "--batch-sizes", "1,4",
         "--context-lengths", "64,256"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 2 prefill points, decode grid 2 batch sizes x 2 contexts" in result.output
    profile = load_profile(out)
    assert profile.model == smollm2_dir.name and profile.kv_capacity_tokens == 512 * 16
    loaded = build_engine(EngineConfig(model_dir=smollm2_dir, engine="mock", timing_profile=out))
    assert loaded.core.executor.profile.decode_grid is not None
    bad = CliRunner().invoke(app, ["profile", "--model", str(tmp_path), "--out", str(out)])
    assert bad.exit_code != 0 and "no config.json" in " ".join(bad.output.replace("│", "").split())


@pytest.mark.slow
def test_builtin_engine_profile_loads_into_the_planner(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2 on the built-in engine (CPU, wall clock): a small grid, then the planner's
    capacity model and the mock both read the file."""
    loaded = build_engine(
        EngineConfig(model_dir=smollm2_dir, engine="builtin", num_blocks=256, max_model_len=1024)
    )
    plan = ProfilePlan((16, 128), (1, 4), (32, 128), decode_steps=3, repeats=2)
    result = profile_engine(
        loaded.core, engine="builtin", model=loaded.info.name, device="cpu",
        vocab_size=loaded.info.vocab_size, plan=plan,
    )  # fmt: skip
    path = tmp_path / "smollm2-cpu.json"
    result.save(path)
    profile = load_profile(path)
    assert profile.engine == "builtin" and profile.notes["timing"] == "wall clock"
    assert all(ms > 0 for _, ms in profile.prefill)
    # An SLA this machine can meet whatever else runs on it: ten times the measured times.
    slowest_ms = max(ms for row in profile.decode_grid.ms for ms in row)
    sla = SlaConfig(ttft_s=profile.prefill[-1][1] / 100, itl_s=slowest_ms / 100)
    model = CapacityModel(profile, sla)
    for role in ("prefill", "decode", "both"):
        capacity = model.per_replica(role, 100, 20)
        assert 0 < capacity.request_rate < math.inf, role
        assert not capacity.limit.startswith("infeasible"), (role, capacity)
    mock = build_engine(EngineConfig(model_dir=smollm2_dir, engine="mock", timing_profile=path))
    assert mock.core.executor.profile.prefill_points == tuple(
        (float(n), ms) for n, ms in profile.prefill
    )


@pytest.mark.slow
def test_endpoint_profile_measures_a_mock_worker(smollm2_dir: Path, tmp_path: Path) -> None:
    """``--url``: a mock worker slowed tenfold (so that HTTP noise is small against its
    modelled times) measures close to its model."""
    from serving.worker.config import WorkerConfig
    from serving.worker.server import build_state
    from tests.worker.conftest import serve_in_thread

    config = WorkerConfig(
        engine=EngineConfig(model_dir=smollm2_dir, engine="mock", speedup=0.1, num_blocks=1024)
    )
    server = serve_in_thread(build_state(config))
    try:
        out = tmp_path / "http.json"
        result = CliRunner().invoke(
            app,
            ["profile", "--model", str(smollm2_dir), "--url", server.url, "--out", str(out),
             "--prefill-lengths", "16,1024", "--batch-sizes", "1,4", "--context-lengths", "128"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
    finally:
        server.stop()
    profile = load_profile(out)
    model = TimingProfile()
    assert profile.source == "http" and profile.model == smollm2_dir.name
    for tokens, ms in profile.prefill:  # modelled time / 0.1, plus HTTP and a step's overhead
        assert model.prefill_ms(tokens) * 10 <= ms <= model.prefill_ms(tokens) * 10 + 150
    for row in profile.decode_grid.ms:
        assert model.decode_ms(0.0) * 10 <= row[0] <= model.decode_ms(0.1) * 10 + 60
    assert profile.kv_capacity_tokens == pytest.approx(1024 * 16, rel=0.25)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read profile"),
        ("{not json", "is not JSON"),
        ('{"format": "other/2"}', "format is 'other/2'"),
        (json.dumps({"format": "strata-profile/1", "engine": "mock", "model": "m",
                     "max_num_seqs": 4, "prefill": [[64, 2.0], [16, 1.0]],
                     "decode_grid": {"batch_sizes": [1], "context_tokens": [8], "ms": [[1.0]]}}),
         "increasing token counts"),
        (json.dumps({"format": "strata-profile/1", "engine": "mock", "model": "m",
                     "max_num_seqs": 4, "prefill": [[16, 1.0]], "speed": 3,
                     "decode_grid": {"batch_sizes": [1], "context_tokens": [8], "ms": [[1.0]]}}),
         "speed: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_bad_profiles_are_named_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)
