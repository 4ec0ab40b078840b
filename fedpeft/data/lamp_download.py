"""Download LaMP's official files: ``python -m fedpeft.data download lamp --task LaMP-2 --split user --out DIR``."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

from fedpeft.data.lamp_tasks import parse_task

BASE_URL = "https://ciir.cs.umass.edu/downloads/LaMP"


class DownloadError(RuntimeError):
    """A LaMP file could not be fetched (offline, HTTP error, or an HTML page instead of JSON)."""


def lamp_urls(task: str, split: str, sets: tuple[str, ...] = ("train", "dev", "test"), base_url: str = BASE_URL) -> dict[str, str]:
    """file name -> official URL. User split: BASE/LaMP_<n>/<set>/; time split: BASE/time/LaMP_<n>/<set>/;
    LaMP-2 (movie tagging since 2024) lives under LaMP_2/new/ (LaMP_2/ serves the old news task)."""
    spec = parse_task(task)
    if spec.number == 6:
        raise DownloadError("LaMP-6 (Avocado emails) is not distributed by LaMP: the Avocado corpus is licensed (LDC2015T03). "
                            "Build it with LaMP's data/avocado/create_avocado_dataset.py and set data.path to its folder.")
    if split not in ("user", "time"):
        raise DownloadError(f"--split {split!r}: use 'user' or 'time'.")
    bad = [s for s in sets if s not in ("train", "dev", "test")]
    if bad:
        raise DownloadError(f"unknown set(s) {bad}: use train, dev, test.")
    folder = f"LaMP_{spec.number}" + ("/new" if spec.number == 2 else "")
    if split == "time":
        folder = "time/" + folder
    base = base_url.rstrip("/")
    urls = {}
    for s in sets:
        for kind in ("questions", "outputs") if s != "test" else ("questions",):  # test golds are withheld
            urls[f"{s}_{kind}.json"] = f"{base}/{folder}/{s}/{s}_{kind}.json"
    return urls


def _fetch(url: str, dest: Path, timeout: float, progress: bool) -> int:
    from tqdm import tqdm

    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            size = 0
            head = b""
            with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                                               disable=not progress, file=sys.stderr) as bar:
                while chunk := resp.read(1 << 16):
                    if len(head) < 64:
                        head += chunk[:64]
                    out.write(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        start = head.lstrip()[:1]
        if start not in (b"{", b"["):
            raise DownloadError(f"{url} returned {head[:40]!r}..., not JSON (a wrong path often gives an HTML page). "
                                "Check --task/--split and --base-url.")
        tmp.replace(dest)
        return size
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}. Check --task/--split and --base-url.") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"could not reach {url} ({reason}). You seem to be offline or the server is down: download the files "
            f"on a machine with internet access and copy them into {dest.parent}, or pass --base-url of a mirror."
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def download(task: str, split: str, out: str | Path, base_url: str = BASE_URL, sets: tuple[str, ...] = ("train", "dev", "test"),
             timeout: float = 60.0, progress: bool = True) -> dict[str, int]:
    """Fetch LaMP's official files of ``task``/``split`` into ``out``; returns file name -> bytes."""
    urls = lamp_urls(task, split, sets, base_url)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {name: _fetch(url, out / name, timeout, progress) for name, url in urls.items()}
