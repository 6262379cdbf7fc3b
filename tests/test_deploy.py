"""Deployment: docker-compose.yml runs PostgreSQL, `registry serve` and the daemon on one store volume, and the
serve image (the Dockerfile with EXTRAS=serve) works without torch.

No Docker daemon is needed: `docker-compose config` validates the file, the healthcheck's own command runs
against a real server, and the no-torch promise is checked by serving a model in a process that then has no ML
package in sys.modules (torch is installed in the test environment, so any import of it, even a guarded one,
would show).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
ML_PACKAGES = ("torch", "transformers", "peft", "gptqmodel", "optimum", "accelerate")


@pytest.fixture(scope="module")
def compose() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _command(service: dict) -> list[str]:
    cmd = service["command"]
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _healthcheck_url(service: dict) -> str:
    test = " ".join(service["healthcheck"]["test"])
    match = re.search(r"https?://[^'\" ]+", test)
    assert match, f"no URL in the healthcheck {test!r}"
    return match.group(0)


def test_docker_compose_accepts_the_file():
    if not shutil.which("docker-compose"):
        pytest.fail("docker-compose is not installed; `make test-deps` installs it (apt-get install docker-compose)")
    proc = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin:/usr/local/bin",
                                                                          "COMPOSE_PROJECT_NAME": "t"})
    assert proc.returncode == 0, proc.stderr


def test_serve_service_runs_the_catalog_without_torch_on_the_shared_store(compose):
    services = compose["services"]
    serve, daemon = services["serve"], services["daemon"]
    # Built from the same Dockerfile with only the serve extra: a small image without torch.
    assert serve["build"]["args"]["EXTRAS"] == "serve"
    assert serve["build"].get("context", ".") == daemon.get("build", ".")
    cmd = _command(serve)
    assert cmd[:2] == ["registry", "serve"], cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000", cmd
    assert "--allow-anonymous-read" not in cmd  # an option the file names in a comment, off by default
    assert "8000:8000" in [str(p) for p in serve["ports"]]
    # Same catalog and the same store, mounted where REGISTRY_HOME points, in serve, the daemon and the workers.
    env = serve["environment"]
    url = env["REGISTRY_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://") and "@postgres/" in url, url
    for name in ("daemon", "worker", "init"):
        assert services[name]["environment"] == env, name
        assert f"store:{env['REGISTRY_HOME']}" in services[name]["volumes"], name
    assert f"store:{env['REGISTRY_HOME']}" in serve["volumes"] and "store" in compose["volumes"]


def test_the_catalog_is_migrated_once_before_serve_and_the_daemon_start(compose):
    services = compose["services"]
    init = services["init"]
    assert _command(init) == ["registry", "init"]
    assert init["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("serve", "daemon", "worker"):
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully", name


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _package_folder(package: str, package_dirs: dict[str, str]) -> str:
    """The repository folder a package installs from (package-dir maps registry.workers to workers/)."""
    for prefix in sorted(package_dirs, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            return "/".join([package_dirs[prefix], *package[len(prefix):].split(".")[1:]])
    return package.replace(".", "/")


def test_the_dockerfile_installs_the_extra_it_is_given_and_copies_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG EXTRAS=", dockerfile, re.M)
    assert re.search(r'^RUN pip install .*"\.\$\{EXTRAS:\+\[\$EXTRAS\]\}"', dockerfile, re.M)
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    setuptools = _setuptools()
    for package in setuptools["packages"]:
        top = _package_folder(package, setuptools.get("package-dir", {})).split("/")[0]
        assert top in copied, f"the Dockerfile does not COPY {top}/ (package {package})"


def test_a_non_editable_install_has_every_module_template_and_static_file():
    # The image runs `pip install .`, which installs only the packages and package data pyproject names: a
    # folder of modules (registry/server) or a template left out works in the editable checkout and fails there.
    setuptools = _setuptools()
    package_dirs = setuptools.get("package-dir", {})
    folders = {_package_folder(p, package_dirs): p for p in setuptools["packages"]}
    data = setuptools.get("package-data", {})
    for top in {f.split("/")[0] for f in folders}:
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            rel = path.relative_to(ROOT)
            if path.suffix == ".py" and rel.parent.as_posix() in folders:
                continue
            # Else package data: llama.cpp's vendored converter (registry/_vendor) is run as a script, not imported.
            owners = [(folder, package) for folder, package in folders.items()
                      if rel.as_posix().startswith(folder + "/")]
            folder, package = max(owners, key=lambda fp: len(fp[0]))
            inside = rel.relative_to(folder)
            assert any(inside.match(glob) for glob in data.get(package, [])), \
                f"{rel} is not in pyproject's package-data for {package}"


def test_the_serve_extra_and_the_base_dependencies_name_no_ml_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["serve"]
    for requirement in wanted:
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()
        assert name not in ML_PACKAGES and not requirement.startswith("registry["), requirement
    serve_extra = {re.split(r"[\[<>=]", r)[0] for r in project["optional-dependencies"]["serve"]}
    assert {"fastapi", "uvicorn", "jinja2"} <= serve_extra


# Serves a tiny model from each catalog given (one process, so the imports are paid once) and reports which ML
# packages the process imported: the app, a download through the HF endpoint, the JSON API and the web page must
# work and load none of them.
WITHOUT_ML = textwrap.dedent("""
    import json, struct, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from registry import Registry
    from registry.importer import import_folder
    from serving import make_token, serve_in_thread
    import httpx

    model = Path(sys.argv[1])
    model.mkdir()
    (model / "config.json").write_text(json.dumps({{"model_type": "llama"}}))
    header = json.dumps({{"w": {{"dtype": "U8", "shape": [64], "data_offsets": [0, 64]}}}}).encode()
    header += b" " * (-len(header) % 8)
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(64)))
    report = {{}}
    for home, db_url in zip(sys.argv[2::2], sys.argv[3::2]):
        reg = Registry(home, db_url or None)
        reg.init()
        import_folder(reg, model, "acme/tiny")
        headers = {{"Authorization": "Bearer " + make_token(reg, "read")}}
        with serve_in_thread(reg) as url:
            with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
                statuses = {{path: http.get(path).status_code for path in
                            ("/v1/health", "/v1/artifacts?q=tiny", "/api/models/acme/tiny",
                             "/acme/tiny/resolve/main/model.safetensors", "/")}}
                body = http.get("/acme/tiny/resolve/main/model.safetensors").content
        report[db_url or "sqlite"] = {{"statuses": statuses,
                                      "same_bytes": body == (model / "model.safetensors").read_bytes()}}
    report["loaded"] = sorted(m for m in {ml!r} if m in sys.modules)
    print(json.dumps(report))
""")


def test_the_server_imports_no_ml_package(tmp_path, monkeypatch):
    from conftest import _create_pg_database, _drop_pg_database, _pg_url

    monkeypatch.delenv("REGISTRY_DATABASE_URL", raising=False)
    pg_name = _create_pg_database()
    try:
        catalogs = [str(tmp_path / "home-sqlite"), "", str(tmp_path / "home-pg"), _pg_url(pg_name)]
        code = WITHOUT_ML.format(ml=ML_PACKAGES, tests=str(ROOT / "tests"))
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model"), *catalogs], capture_output=True,
                              text=True, timeout=60)
    finally:
        _drop_pg_database(pg_name)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report.pop("loaded") == []
    assert len(report) == 2  # SQLite and PostgreSQL
    for backend, result in report.items():
        assert set(result["statuses"].values()) == {200}, (backend, result["statuses"])
        assert result["same_bytes"], backend


@pytest.mark.parametrize("home", ["sqlite", "postgresql"], indirect=True)
def test_the_compose_healthcheck_passes_against_a_running_server_without_a_token(compose, home):
    from serving import serve_in_thread

    from registry.server.auth import PUBLIC_PATHS

    serve = compose["services"]["serve"]
    target = urlsplit(_healthcheck_url(serve))
    assert target.path in PUBLIC_PATHS  # no token inside the container's healthcheck
    assert target.port == int(_command(serve)[_command(serve).index("--port") + 1])
    test = serve["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python", test  # python:3.11-slim has no curl or wget
    with serve_in_thread() as url:
        # The healthcheck's own command, pointed at this server instead of the container's port 8000.
        argv = [sys.executable if arg == "python" else arg.replace(f"http://{target.netloc}", url) for arg in test[1:]]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
