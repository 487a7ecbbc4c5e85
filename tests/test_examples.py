"""The job-array examples in docs/examples/ are valid and run the commands they claim.

The Kubernetes manifest is checked against the batch/v1 Job schema (``kubernetes-validate``,
strict: an unknown field is an error) for the oldest and newest Kubernetes it ships schemas
for; every ``toolchain`` command line in both examples is parsed by the real CLI, with the
shard index each worker would get; and the N of ``--shard I/N`` matches the number of workers.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from toolchain import cli
from toolchain.commands import BottlenecksCommand, BuildCommand

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
KUBERNETES = EXAMPLES / "kubernetes-bottlenecks-job.yaml"
ACTIONS = EXAMPLES / "github-actions-bottlenecks.yml"


def _jobs() -> list[dict]:
    return list(yaml.safe_load_all(KUBERNETES.read_text(encoding="utf-8")))


@pytest.mark.parametrize("version", ["1.25.0", "latest"])
def test_the_kubernetes_jobs_match_the_job_schema(version):
    from kubernetes_validate import utils

    version = utils.latest_version() if version == "latest" else version
    jobs = _jobs()
    assert [job["kind"] for job in jobs] == ["Job", "Job"]
    for job in jobs:
        utils.validate(job, version, strict=True)  # raises on any error


def test_a_broken_manifest_fails_the_schema_check():
    """The check above can fail: a misspelt field and a wrong type are both caught."""
    from kubernetes_validate import utils

    job = _jobs()[0]
    job["spec"]["completion"] = job["spec"].pop("completions")
    with pytest.raises(utils.ValidationError):
        utils.validate(job, utils.latest_version(), strict=True)
    job = _jobs()[0]
    job["spec"]["parallelism"] = "eight"
    with pytest.raises(utils.ValidationError):
        utils.validate(job, utils.latest_version(), strict=True)


def test_each_indexed_pod_computes_its_own_shard_of_one_cache():
    shard_job, build_job = _jobs()
    spec = shard_job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    container = spec["template"]["spec"]["containers"][0]
    env = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"] for item in container["env"]}
    assert env["SHARD"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    seen = set()
    for index in range(spec["completions"]):
        args = [arg.replace("$(SHARD)", str(index)) for arg in container["args"]]
        assert args[0] == "toolchain"
        options = cli.options_for(args[1:])
        assert isinstance(options, BottlenecksCommand)
        assert options.shard == f"{index}/{spec['completions']}"
        seen.add(options.shard)
    assert len(seen) == spec["completions"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert str(options.image_dir) == mounts["photos"] and str(options.cache_dir) == mounts["cache"]

    build = build_job["spec"]["template"]["spec"]["containers"][0]["args"]
    options = cli.options_for(build[1:])
    assert isinstance(options, BuildCommand) and options.require_cached
    assert str(options.cache_dir) == mounts["cache"]


def _runs(job: dict) -> list[str]:
    return [step["run"] for step in job["steps"] if "run" in step]


def test_the_github_actions_matrix_runs_every_shard_then_builds_from_the_cache():
    workflow = yaml.safe_load(ACTIONS.read_text(encoding="utf-8"))
    shard, build = workflow["jobs"]["shard"], workflow["jobs"]["build"]
    indexes = shard["strategy"]["matrix"]["index"]
    assert build["needs"] == "shard"
    commands = [run for run in _runs(shard) if "toolchain " in run]
    assert len(commands) == 1
    shards = []
    for index in indexes:
        line = commands[0].replace("${{ matrix.index }}", str(index))
        shards.append(cli.options_for(shlex.split(line)[1:]).shard)
    assert shards == [f"{index}/{len(indexes)}" for index in range(len(indexes))]
    status, final = (cli.options_for(shlex.split(run)[1:]) for run in _runs(build)
                     if "toolchain " in run)
    assert status.status and status.shards == len(indexes)
    assert final.require_cached and final.cache_dir == status.cache_dir
    assert all(re.fullmatch(r"[\w./-]+@v\d+", step["uses"])
               for job in (shard, build) for step in job["steps"] if "uses" in step)
