"""The shell commands a document shows its reader: the lines of its ```bash blocks.

One parser for every test that holds the docs to what the code does (test_k8s, test_documented_commands).
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def bash_commands(document: Path) -> list[str]:
    """Non-comment lines of the document's ```bash blocks, backslash continuations joined, in order."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", document.read_text(), flags=re.S):
        block = re.sub(r"\s*\\\n\s*", " ", block)
        lines += [
            line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")
        ]
    return lines


def without_comment(command: str) -> str:
    """The command without its trailing `# ...` remark (a `#` inside quotes stays)."""
    quote = None
    for i, char in enumerate(command):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command.rstrip()


REPO_ROOT = Path(__file__).resolve().parent.parent
# Environment a new user's shell does not have: Ray and MLflow settings this machine's suite may carry.
FOREIGN_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI")


class NewUser:
    """A fresh shell in a fresh checkout: an empty HOME, no Ray token, no tracking URI, the venv on PATH.

    The working folder holds the checkout's configs/, launch/, mlflow/ and k8s/ (linked), so documented relative
    paths (`--config configs/...`, `mlflow/start_server.sh`, `runs/<run>`) mean what they mean to a user.
    """

    def __init__(self, root: Path, substitutions: dict[str, str] | None = None):
        self.cwd = root / "checkout"
        self.cwd.mkdir(parents=True)
        for name in ("configs", "launch", "mlflow", "k8s"):
            (self.cwd / name).symlink_to(REPO_ROOT / name)
        (root / "home").mkdir()
        env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        env["HOME"] = str(root / "home")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.env = env
        self.substitutions = dict(substitutions or {})

    def argv(self, command: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
        """The documented command as an argument list: placeholders filled, `python` this interpreter."""
        text = without_comment(command)
        for placeholder, value in self.substitutions.items():
            text = text.replace(placeholder, value)
        args = shlex.split(text)
        if args[0] == "python":
            args[0] = sys.executable
        return args + list(extra)

    def run(self, command: str, extra: list[str] | tuple[str, ...] = (), timeout: float = 300):
        done = subprocess.run(
            self.argv(command, extra),
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, (
            f"`{command}` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        return done

    def start(self, command: str, extra: list[str] | tuple[str, ...] = ()) -> subprocess.Popen:
        """A documented long-running command (a server), in its own process group."""
        return subprocess.Popen(
            self.argv(command, extra),
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop(process: subprocess.Popen) -> None:
    """End a started command and everything it spawned."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 120) -> str:
    """The body of `url` once it answers 200; fails early if the server process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server for {url} exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return response.read().decode()
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")
