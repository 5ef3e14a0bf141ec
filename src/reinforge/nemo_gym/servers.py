"""NeMo Gym's servers for a run: started with `ng_run` (or reused when already answering), discovered from the head
server, stopped when the run ends.

`ng_run "+config_paths=[...]" "+skip_venv_if_present=true"` runs in `nemo_gym_dir` with NeMo Gym's environment first
on PATH (ng_run calls `uv`); it starts Ray, the head server (`GET /server_instances` lists every server with its
URL) and the servers of the configs. With `skip_venv_if_present` each server directory's `.venv` is used as it is
(`make gym` links them to .venv-gym, so nothing is downloaded). ng_run runs in its own session; stopping sends it
SIGTERM (it stops its servers and Ray), then SIGKILL to its process group if it has not gone within the grace time.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import yaml

from reinforge.training.setup import RunError

log = logging.getLogger(__name__)

SERVER_KINDS = ("resources_servers", "responses_api_models", "responses_api_agents", "environment_servers")
STOP_GRACE_S = 60.0


class NemoGymError(RunError):
    """NeMo Gym cannot be started, reached or used; the message names the URL or file and the fix."""


@dataclass(frozen=True)
class ServerInstance:
    """One server the head server lists.

    name: its top-level name in the NeMo Gym config (what `agent_ref.name` and `nemo_gym_datasets[].server_name`
    refer to); kind: resources_servers, responses_api_models, responses_api_agents or environment_servers;
    implementation: the server directory's name (e.g. simple_agent); url: its base URL.
    """

    name: str
    kind: str
    implementation: str
    url: str


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or `localhost`."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_gym_dir(gym_dir: Path, auto_clone: bool | None) -> None:
    """Raise NemoGymError when NeMo Gym's directory is missing; Axolotl would clone it there
    (`nemo_gym_auto_clone`, default on): reinforge refuses to, saying how to install it."""
    if gym_dir.is_dir():
        return
    why = ("nemo_gym_auto_clone asks to clone NeMo Gym there, which reinforge does not do (no network access "
           "is assumed; nothing is fetched at run time)" if auto_clone is not False else "nemo_gym_auto_clone is off")
    raise NemoGymError(f"nemo_gym_dir {gym_dir} does not exist and {why}: install NeMo Gym from PyPI with `make gym` "
                       f"and set nemo_gym_dir to .venv-gym/lib/python3.13/site-packages (or to a clone you made)")


def find_bin_dir(gym_dir: Path, venv: str | None) -> Path | None:
    """The bin/ directory that has `ng_run`: `venv`/bin, else gym_dir/.venv/bin, else .venv-gym/bin in the working
    directory or the reinforge checkout; None: rely on PATH."""
    candidates = [Path(os.path.expanduser(venv))] if venv else []
    candidates += [gym_dir / ".venv", Path.cwd() / ".venv-gym", Path(__file__).resolve().parents[3] / ".venv-gym"]
    for c in candidates:
        if (c / "bin" / "ng_run").exists():
            return (c / "bin").absolute()
    if venv:
        raise NemoGymError(f"nemo_gym_venv {venv}: no bin/ng_run there (install NeMo Gym into it: `make gym`)")
    return None


def _declared(config_paths: list[str], gym_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(top-level name, its mapping) of every server the config files declare directly. Unreadable files are
    ng_run's to report."""
    out = []
    for p in config_paths:
        path = Path(os.path.expanduser(p))
        path = path if path.is_absolute() else gym_dir / path
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        for key, value in data.items() if isinstance(data, dict) else []:
            if isinstance(value, dict) and any(k in value for k in SERVER_KINDS):
                out.append((key, value))
    return out


def expected_servers(config_paths: list[str], gym_dir: Path) -> list[str]:
    """Top-level names of the servers the config files declare directly (a file that only includes others via
    `config_paths` declares none itself)."""
    return [name for name, _ in _declared(config_paths, gym_dir)]


def max_steps_overrides(config_paths: list[str], gym_dir: Path, max_turns: int | None) -> list[str]:
    """ng_run arguments setting `max_steps` (most model calls of an episode) of every agent the configs declare to
    `max_turns` (none when it is None). ng_run's command-line values win over the config files'."""
    if max_turns is None:
        return []
    return [f"++{name}.responses_api_agents.{impl}.max_steps={max_turns}"
            for name, value in _declared(config_paths, gym_dir)
            for impl in (value.get("responses_api_agents") or {})]


class NemoGymServers:
    """The NeMo Gym servers of a run, as a context manager: on entry reuse a head server already answering on
    `host:head_port`, else (with `auto_start`) start `ng_run`, and wait up to `timeout` s until the head server and
    every server it lists (and every server the configs declare) answer; on exit stop what was started.

    Args:
        gym_dir: NeMo Gym's directory (ng_run's working directory; config paths are relative to it).
        config_paths: NeMo Gym config YAMLs for ng_run.
        host, head_port: where the head server listens (servers it starts default to `host`).
        timeout: seconds to wait at start.
        auto_start: start ng_run when no head server answers (else that is an error).
        venv: the environment with ng_run (see `find_bin_dir`).
        log_path: file for ng_run's output (default: a file in the working directory).
        wait_for_head: wait (up to `timeout`) for a head server that another process starts, instead of starting
            one or failing at once.
        max_turns: every agent's `max_steps` when ng_run is started here; with servers already running, each
            agent's configured `max_steps` must equal it.
    Raises (on entry):
        NemoGymError: no head server and no auto-start; ng_run missing, exited, or not ready in time (with the end
            of its log); a server on a non-loopback address while `host` is loopback.
    """

    def __init__(self, gym_dir: Path, config_paths: list[str] | None, *, host: str = "127.0.0.1", head_port: int = 11000,
                 timeout: float = 360.0, auto_start: bool = True, venv: str | None = None,
                 log_path: Path | None = None, wait_for_head: bool = False, max_turns: int | None = None):
        self.gym_dir, self.config_paths = Path(gym_dir), list(config_paths or [])
        self.max_turns = max_turns
        self.host, self.head_port, self.timeout, self.auto_start = host, head_port, timeout, auto_start
        self.venv, self.log_path, self.wait_for_head = venv, log_path, wait_for_head
        self.head_url = f"http://{host}:{head_port}"
        self.proc: subprocess.Popen | None = None
        self.instances: list[ServerInstance] = []
        self._http = httpx.Client(timeout=httpx.Timeout(10.0, connect=3.0))

    # --- life cycle ------------------------------------------------------------------------------------------
    def __enter__(self) -> "NemoGymServers":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Reuse or start the servers and discover them (see the class docstring)."""
        if self._head_instances() is not None:
            log.info("NeMo Gym head server already answering at %s: reusing its servers (left running)", self.head_url)
            expected: list[str] = []
        elif self.wait_for_head:  # another process of the run starts them
            expected = []
        elif not self.auto_start:
            raise NemoGymError(f"no NeMo Gym head server answers at {self.head_url}; start the servers "
                               f"(`ng_run \"+config_paths=[...]\" \"+skip_venv_if_present=true\"` in nemo_gym_dir) or "
                               f"set nemo_gym_auto_start: true with nemo_gym_config_paths")
        else:
            self._launch()
            expected = expected_servers(self.config_paths, self.gym_dir)
        self.instances = self._wait_ready(expected)
        if self.max_turns is not None and self.proc is None:
            self._check_max_steps()
        for inst in self.instances:
            host = urlparse(inst.url).hostname or ""
            if not is_loopback(host) and is_loopback(self.host):
                raise NemoGymError(f"NeMo Gym server {inst.name} listens on {inst.url}, not on a loopback address; "
                                   f"reinforge talks to loopback servers only unless nemo_gym_host is set to a "
                                   f"non-loopback address")
        log.info("NeMo Gym servers: %s", ", ".join(f"{i.name} ({i.kind}) {i.url}" for i in self.instances))

    def _launch(self) -> None:
        if not self.gym_dir.is_dir():
            raise NemoGymError(f"nemo_gym_dir {self.gym_dir} is not a directory (NeMo Gym's, with resources_servers/; "
                               f"`make gym` installs it into .venv-gym)")
        bin_dir = find_bin_dir(self.gym_dir, self.venv)
        env = dict(os.environ)
        if bin_dir is not None:
            env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        ng_run = str(bin_dir / "ng_run") if bin_dir is not None else "ng_run"
        paths = ",".join(self.config_paths)
        cmd = [ng_run, f"+config_paths=[{paths}]", "+skip_venv_if_present=true",
               f"+head_server={{host: {self.host}, port: {self.head_port}}}", f"+default_host={self.host}",
               *max_steps_overrides(self.config_paths, self.gym_dir, self.max_turns)]
        self.log_path = self.log_path or Path.cwd() / "nemo_gym.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting NeMo Gym in %s: %s (log: %s)", self.gym_dir, " ".join(cmd), self.log_path)
        try:
            self.proc = subprocess.Popen(cmd, cwd=self.gym_dir, env=env, stdout=self.log_path.open("w"),
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except FileNotFoundError:
            raise NemoGymError(f"ng_run not found ({ng_run}): install NeMo Gym (`make gym`) or set nemo_gym_venv") from None
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop ng_run (its servers and Ray) if this object started it; idempotent."""
        self._http.close()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        pgid = proc.pid  # its own session: the process group id is its pid
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("ng_run did not stop within %.0f s of SIGTERM: killing its process group", STOP_GRACE_S)
        deadline = time.monotonic() + 15.0
        while _group_alive(pgid) and time.monotonic() < deadline:  # Ray's processes leave a few seconds later
            time.sleep(0.3)
        if _group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        log.info("NeMo Gym servers stopped")

    # --- discovery -------------------------------------------------------------------------------------------
    def _head_instances(self) -> list[dict[str, Any]] | None:
        """The head server's /server_instances list, or None when it does not answer."""
        try:
            r = self._http.get(f"{self.head_url}/server_instances", timeout=5.0)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        try:
            data = r.json()
        except ValueError:
            return None
        return data if isinstance(data, list) else None

    def _answers(self, url: str) -> bool:
        try:
            self._http.get(url, timeout=3.0)
            return True
        except httpx.HTTPError:
            return False

    def _wait_ready(self, expected: list[str]) -> list[ServerInstance]:
        deadline = time.monotonic() + self.timeout
        status = "the head server does not answer"
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise NemoGymError(f"ng_run exited with code {self.proc.returncode} before its servers were ready; "
                                   f"end of {self.log_path}:\n{self._log_tail()}")
            raw = self._head_instances()
            if raw is not None:
                instances = [_instance(d) for d in raw if isinstance(d, dict)]
                names = {i.name for i in instances}
                missing = [n for n in expected if n not in names]
                silent = [i.name for i in instances if not self._answers(i.url)]
                if not missing and not silent and instances:
                    return instances
                status = (f"not listed yet: {', '.join(missing)}" if missing else
                          f"not answering yet: {', '.join(silent)}" if silent else "the head server lists no server")
            if time.monotonic() > deadline:
                where = f"; end of {self.log_path}:\n{self._log_tail()}" if self.proc is not None else ""
                raise NemoGymError(f"NeMo Gym servers at {self.head_url} not ready within {self.timeout:.0f} s "
                                   f"(nemo_gym_server_timeout): {status}{where}")
            time.sleep(1.0)

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""
        except OSError:
            return ""

    def global_config(self) -> dict[str, Any]:
        """The head server's merged NeMo Gym config (`GET /global_config_dict_yaml`: the YAML text as a JSON string).
        Raises NemoGymError when it cannot be read."""
        try:
            r = self._http.get(f"{self.head_url}/global_config_dict_yaml", timeout=10.0)
            r.raise_for_status()
            data = yaml.safe_load(r.json())
        except (httpx.HTTPError, ValueError, yaml.YAMLError) as exc:
            raise NemoGymError(f"cannot read NeMo Gym's config from {self.head_url}/global_config_dict_yaml: "
                               f"{type(exc).__name__}: {exc}") from None
        if not isinstance(data, dict):
            raise NemoGymError(f"{self.head_url}/global_config_dict_yaml is not a mapping")
        return data

    def declared(self, kind: str) -> dict[str, dict[str, Any]]:
        """name → the server's own settings, for every server of `kind` in the head server's config."""
        out = {}
        for name, value in self.global_config().items():
            impls = value.get(kind) if isinstance(value, dict) else None
            if isinstance(impls, dict):
                for settings in impls.values():
                    if isinstance(settings, dict):
                        out[name] = settings
        return out

    def _check_max_steps(self) -> None:
        wrong = {n: s.get("max_steps") for n, s in self.declared("responses_api_agents").items()
                 if s.get("max_steps") != self.max_turns}
        if wrong:
            raise NemoGymError(f"nemo_gym_max_turns is {self.max_turns}, but the running NeMo Gym agents have max_steps "
                               + ", ".join(f"{n}: {v}" for n, v in wrong.items()) + " (servers reinforge did not "
                               f"start are not reconfigured): start them with `++<agent>.responses_api_agents.<impl>."
                               f"max_steps={self.max_turns}`, or drop nemo_gym_max_turns")

    # --- look-ups --------------------------------------------------------------------------------------------
    def of_kind(self, kind: str) -> dict[str, ServerInstance]:
        return {i.name: i for i in self.instances if i.kind == kind}

    def resources_server(self, name: str) -> ServerInstance:
        """The resource server called `name`. Raises NemoGymError listing the ones there are."""
        servers = self.of_kind("resources_servers")
        if name not in servers:
            raise NemoGymError(f"NeMo Gym has no resource server {name!r} (head server {self.head_url} lists: "
                               f"{', '.join(servers) or 'none'}); check nemo_gym_datasets[].server_name and the configs")
        return servers[name]

    def agent(self, name: str | None) -> ServerInstance:
        """The agent called `name` (None: the only agent). Raises NemoGymError listing the agents there are."""
        agents = self.of_kind("responses_api_agents")
        if name is None and len(agents) == 1:
            return next(iter(agents.values()))
        if name not in agents:
            raise NemoGymError(f"NeMo Gym has no agent {name!r} (head server {self.head_url} lists: "
                               f"{', '.join(agents) or 'none'}); multi-turn needs an agent server in the configs "
                               f"and rows whose agent_ref (or nemo_gym_datasets[].server_name) names it")
        return agents[name]


def _instance(d: dict[str, Any]) -> ServerInstance:
    url = d.get("url") or f"http://{d.get('host')}:{d.get('port')}"
    dir_path = str(d.get("dir_path") or "")
    return ServerInstance(name=str(d.get("config_path") or d.get("name")), kind=str(d.get("server_type") or ""),
                          implementation=Path(dir_path).name or str(d.get("name")), url=url.rstrip("/"))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # zombies count as gone: only a process that still runs keeps ports or Ray state
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 3 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def free_port() -> int:
    """A free TCP port on the loopback address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
