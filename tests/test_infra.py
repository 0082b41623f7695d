"""infra/: prefect.yaml is what `prefect deploy` accepts and its entrypoints load; compose, Dockerfiles and
the Kubernetes job template are valid and every command, file and entrypoint they name exists."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
EVALUATE_FILE = ROOT / "flows" / "evaluate_flow.py"


def prefect_yaml() -> dict:
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in prefect_yaml()["deployments"]}


def check_command(argv: list[str], where: str) -> None:
    """The command exists and accepts these arguments (parsed by its own CLI, nothing run)."""
    exe, args = argv[0], argv[1:]
    if exe == "mergeline":
        from flows.cli import build_parser

        try:
            build_parser().parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"{where}: `{shlex.join(argv)}` is not a valid mergeline command") from exc
    elif exe == "prefect":
        from prefect.cli._app import _app
        from rich.console import Console

        quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - closed with the process
        try:
            _app.parse_args(args, console=quiet, error_console=quiet, exit_on_error=False, print_error=False)
        except Exception as exc:
            raise AssertionError(f"{where}: `{shlex.join(argv)}`: {exc}") from exc
    elif exe in ("sh", "bash"):
        script = ROOT / args[0]
        assert script.is_file(), f"{where}: script {args[0]} does not exist"
        lines = [ln.strip() for ln in script.read_text().splitlines()]
        commands = [ln for ln in lines if ln and not ln.startswith("#") and not ln.startswith("set ")]
        assert commands, f"{script} runs nothing"
        for line in commands:
            check_command(shlex.split(line), f"{script.name}")
    elif exe == "python" and args[:1] == ["-m"]:
        spec = importlib.util.find_spec(args[1])
        assert spec and "__main__" in Path(spec.origin).read_text(), f"{where}: `{shlex.join(argv)}` runs nothing"
    else:
        raise AssertionError(f"{where}: unexpected executable {exe!r}")


# -- prefect.yaml ----------------------------------------------------------------------------------


def test_prefect_yaml_is_what_prefect_deploy_accepts():
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule

    raw = prefect_yaml()
    model = PrefectYamlModel.model_validate(raw)       # prefect deploy's own validation of the file
    assert {d.name for d in model.deployments} == {"watcher", "merge", "nightly", "evaluate"}
    known = set(DeploymentConfig.model_fields)
    for d in raw["deployments"]:                        # the model ignores unknown keys: catch typos here
        assert set(d) <= known, f"{d['name']}: unknown keys {set(d) - known}"

    pools = raw["definitions"]["work_pools"]
    assert set(pools) == {"cpu", "gpu"}
    by_name = deployments()
    assert {n: d["work_pool"]["name"] for n, d in by_name.items()} == {
        "watcher": "cpu", "merge": "gpu", "nightly": "gpu", "evaluate": "gpu"}

    [nightly] = by_name["nightly"]["schedules"]
    assert (nightly["cron"], nightly["timezone"]) == ("0 2 * * *", "UTC")
    CronSchedule(cron=nightly["cron"], timezone=nightly["timezone"])
    [watch] = by_name["watcher"]["schedules"]
    assert 0 < watch["interval"] <= 600
    assert by_name["watcher"]["concurrency_limit"]["limit"] == 1     # scans never overlap

    # the documented pool commands are valid and name files that exist
    documented = [ln.lstrip("# ").strip() for ln in (INFRA / "prefect.yaml").read_text().splitlines()
                  if ln.startswith("#   prefect ")]
    assert len(documented) == 3
    for line in documented:
        argv = shlex.split(line.split("  #")[0])
        check_command(argv, "prefect.yaml header")
        for i, a in enumerate(argv):
            if a in ("--base-job-template", "--prefect-file"):
                assert (ROOT / argv[i + 1]).is_file(), argv[i + 1]


@pytest.mark.parametrize("name", ["watcher", "merge", "nightly", "evaluate"])
def test_every_entrypoint_loads_as_a_flow_taking_its_parameters(name, monkeypatch):
    from prefect.flows import Flow, load_flow_from_entrypoint

    d = deployments()[name]
    path, _, func = d["entrypoint"].partition(":")
    if name == "evaluate" and not EVALUATE_FILE.exists():
        pytest.skip("flows/evaluate_flow.py (evaluate_flow) is not written yet; its entry is checked once it is")
    assert (ROOT / path).is_file(), f"{name}: {path} does not exist"
    monkeypatch.chdir(ROOT)          # prefect deploy runs from the repository root, the workers from /opt/mergeline
    flow = load_flow_from_entrypoint(d["entrypoint"])
    assert isinstance(flow, Flow)
    accepted = set(flow.parameters.properties)
    given = set(d.get("parameters") or {})
    assert given <= accepted, f"{name}: parameters {given - accepted} are not parameters of {d['entrypoint']}"
    if name == "watcher":
        merge = load_flow_from_entrypoint(deployments()["merge"]["entrypoint"])
        assert d["parameters"]["merge_deployment"] == f"{merge.name}/merge"   # run_deployment finds it


def test_serve_runs_the_same_deployments_as_prefect_yaml(capsys, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main
    from flows.serve import build_deployments

    served = {f"{d.flow_name}/{d.name}": d for d in build_deployments([str(tmp_path)])}
    expected = {"merge/merge", "watch-experts/watcher", "nightly-merge/nightly"}
    expected |= {"evaluate/evaluate"} if EVALUATE_FILE.exists() else set()
    assert set(served) >= expected and {k.split("/")[1] for k in served} <= set(deployments())
    nightly = served["nightly-merge/nightly"].schedules[0].schedule
    assert (nightly.cron, nightly.timezone) == ("0 2 * * *", "UTC")
    watcher = served["watch-experts/watcher"]
    assert watcher.parameters["merge_deployment"] == "merge/merge"
    for key, name in (("watch-experts/watcher", "watcher"), ("nightly-merge/nightly", "nightly")):
        d, want = served[key], deployments()[name]["concurrency_limit"]
        got = (d.concurrency_limit, d.concurrency_options.collision_strategy.value)
        assert got == (want["limit"], want["collision_strategy"]), key
    assert watcher.schedules[0].schedule.interval.total_seconds() == deployments()["watcher"]["schedules"][0]["interval"]

    watch = ["--experts", "s3://models/experts"]
    assert main(["serve", "--recipes", str(tmp_path), *watch, "--dry-run"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in listed} == set(served)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", "--recipes", str(tmp_path), *watch]) == 2            # no server: a hint, not a hang
    assert "--start-server" in capsys.readouterr().err
    assert main(["serve", "--recipes", str(tmp_path / "missing"), "--dry-run"]) == 2  # every scan would fail
    err = capsys.readouterr().err
    assert "recipe not loaded" in err and "nothing to watch" in err


# -- images, compose, Kubernetes -------------------------------------------------------------------


def dockerfile(name: str) -> list[tuple[str, str]]:
    text = (INFRA / name).read_text().replace("\\\n", " ")
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
            if not m[0].lstrip().startswith("#")]


@pytest.mark.parametrize("name, torch_index", [("Dockerfile.cpu", r"/whl/cpu$"), ("Dockerfile.gpu", r"/whl/cu\d+$")])
def test_dockerfiles_copy_what_exists_and_run_real_commands(name, torch_index):
    steps = dockerfile(name)
    assert steps[0][0] == "FROM"
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    assert re.search(torch_index, args["TORCH_INDEX"]), f"{name} installs torch from {args['TORCH_INDEX']}"
    pinned = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert args["TORCH_VERSION"] == pinned, "the image's torch is the version pyproject pins"
    for kind, arg in steps:
        if kind == "COPY":
            *sources, _ = arg.split()
            for s in sources:
                assert (ROOT / s).exists(), f"{name}: COPY {s}: no such file in the repository"
    [workdir] = [a for k, a in steps if k == "WORKDIR"]
    pull = prefect_yaml()["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert workdir == pull, "prefect.yaml's runs start where the image keeps the code"
    [cmd] = [a for k, a in steps if k == "CMD"]
    check_command(json.loads(cmd), name)
    assert not [k for k, _ in steps if k == "ENTRYPOINT"], "Kubernetes jobs pass the command as args"
    packaged = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {a.split()[0].rstrip("/") for k, a in steps if k == "COPY"}
    assert {p.rstrip("*") for p in packaged} <= copied, "every package pyproject installs is copied into the image"
    runs = [a for k, a in steps if k == "RUN"]
    if name == "Dockerfile.cpu":  # numba's loops compiled into the image, after mergeline is installed
        warm = [i for i, a in enumerate(runs) if a == "python -m merge_ops.warm"]
        assert warm and warm[0] > min(i for i, a in enumerate(runs) if "pip install -e ." in a)
        assert importlib.util.find_spec("merge_ops.warm")


def test_build_context_leaves_out_checkouts_local_state():
    """The images build from the repository root: its virtual environment, benchmark checkpoints
    (gigabytes) and this machine's compiled caches stay out of the context."""
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", ".bench/", "**/__pycache__/", ".git/"} <= set(ignored)


def test_compose_stack_is_valid_and_its_commands_exist():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"prefect-server", "minio", "worker"} <= set(services)
    ours = {}
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown service {dep}"
        build = svc.get("build")
        if build:
            context = (INFRA / build["context"]).resolve()
            assert context == ROOT
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
            ours[svc["image"]] = build["dockerfile"]
        for volume in svc.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).is_dir(), f"{name}: bind mount {source} missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"
    for name, svc in services.items():
        if svc.get("image") in ours:
            assert isinstance(svc["command"], list)
            check_command(svc["command"], f"compose service {name}")
    assert services["prefect-server"]["command"][:3] == ["prefect", "server", "start"]
    check_command(services["prefect-server"]["command"], "compose prefect-server")
    gpu = services["worker-gpu"]
    assert ours[gpu["image"]] == "infra/Dockerfile.gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # the example recipe the stack copies to S3 is a recipe the watcher accepts
    from flows.recipe import load_recipe

    for f in (INFRA / "recipes").glob("*.yaml"):
        recipe = load_recipe(f)
        assert recipe.models_from and recipe.output


def test_kubernetes_gpu_job_template_requests_a_gpu_and_defines_every_variable():
    template = yaml.safe_load((INFRA / "k8s" / "gpu-job-template.json").read_text())   # JSON is YAML
    assert json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text()) == template   # work-pool create reads JSON
    config, variables = template["job_configuration"], template["variables"]["properties"]
    manifest = config["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert variables["gpus"]["default"] >= 1
    assert container["args"] == "{{ command }}"         # Prefect's `prefect flow-run execute`, no ENTRYPOINT
    used = set(re.findall(r"{{\s*([\w]+)\s*}}", json.dumps(config)))
    assert used <= set(variables), f"placeholders without a variable: {used - set(variables)}"
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    assert variables["image"]["default"] == compose["services"]["worker-gpu"]["image"]
    assert variables["env"]["default"]["MERGELINE_CATALOG"] == "/data/catalog.duckdb"
    assert {"mountPath": "/data", "name": "catalog"} in container["volumeMounts"]


def test_gpu_image_budget_fits_the_gpu_jobs_memory():
    """The GPU image raises the memory budget so tensors merge whole on the GPU; the pinned buffers
    torch keeps for reuse (up to twice the budget) and the interpreter must fit the job's limit."""
    from flows.unit import DEFAULT_MEMORY_BUDGET_MB

    env = dict(kv.split("=", 1) for k, a in dockerfile("Dockerfile.gpu") if k == "ENV" for kv in a.split())
    budget_mb = float(env["MERGELINE_MEMORY_BUDGET_MB"])
    assert budget_mb > DEFAULT_MEMORY_BUDGET_MB
    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    memory = template["variables"]["properties"]["memory"]["default"]
    assert memory.endswith("Gi") and 2 * budget_mb / 1024 + 4 <= float(memory[:-2]), (budget_mb, memory)
