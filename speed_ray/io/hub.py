"""The Hugging Face hub: which models its local cache holds, whether a hub id names a model the run
can load, and whether a run goes offline.

A run goes offline (``HF_HUB_OFFLINE=1`` for the driver and, through ``init_ray``, its workers) when the
user asks, with ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) in the environment, or when
everything it loads is local; otherwise it stays online. huggingface_hub reads ``HF_HUB_OFFLINE`` once,
when it is imported (``huggingface_hub.constants``), and transformers asks it (``is_offline_mode``), so
going offline after the config loaded sets that constant as well as the environment; ``datasets``
keeps a copy of its own (``datasets.config``), set too when it is already imported.

A gated model needs ``HF_TOKEN``: huggingface_hub reads it itself, and nothing here prints it.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_TIMEOUT_S = 10.0
SEARCH_LIMIT = 200
CLOSE = 0.8  # how alike a name must be to be offered for a typo (difflib's ratio)


def offline() -> bool:
    """Whether the hub is off limits: the user asked (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``),
    or this process went offline (``go_offline``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def go_offline() -> None:
    """Offline from now on: this process (the libraries already imported included) and the Ray workers
    it starts, which get ``HF_HUB_OFFLINE`` from ``init_ray``'s runtime env."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True  # type: ignore[attr-defined]
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None and "HF_DATASETS_OFFLINE" not in os.environ:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True  # type: ignore[attr-defined]


def settle(remote: list[str]) -> None:
    """Go offline unless something in ``remote`` (what the run loads that is not local) needs the hub."""
    if offline():
        go_offline()  # also when asked with TRANSFORMERS_OFFLINE only: datasets and the workers follow
        logger.debug("hub: offline (HF_HUB_OFFLINE)")
    elif remote:
        logger.info(f"hub: online, for {', '.join(remote)}")
    else:
        go_offline()
        logger.debug("hub: offline (everything the run loads is local)")


def describe() -> str:
    """This process's hub state in a line, for ``speed-ray doctor`` (whether a token is set, never it)."""
    from huggingface_hub import constants, get_token

    state = "offline (HF_HUB_OFFLINE)" if offline() else f"online ({constants.ENDPOINT})"
    token = "a token (HF_TOKEN or hf auth login)" if get_token() else "no token (HF_TOKEN unset)"
    return f"{state}, {token}; cache {cache_folder()} with {len(cached_models())} models"


def cache_folder() -> Path:
    """The local Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, repo_type: str = "model") -> Path | None:
    """The cached snapshot of ``repo_id``'s main revision (or None), found with no network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", repo_type=repo_type)
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def cached_models() -> list[str]:
    """The model ids the local hub cache holds (listed, not loaded)."""
    try:
        folders = sorted(p.name for p in cache_folder().iterdir() if p.name.startswith("models--"))
    except OSError:
        return []
    return [name.removeprefix("models--").replace("--", "/") for name in folders]


def dataset_cached(dataset: dict) -> bool:
    """Whether the hub cache holds a dataset (``{"path": "org/name", "revision": sha or None}``, as mteb's
    task metadata names it) at that revision, or at main when none is pinned."""
    repo = cache_folder() / f"datasets--{str(dataset.get('path', '')).replace('/', '--')}"
    revision = dataset.get("revision")
    return (repo / "snapshots" / revision).is_dir() if revision else (repo / "refs" / "main").is_file()


def closest(spec: str, names: list[str]) -> list[str]:
    """Up to three of ``names`` that look like ``spec``, case aside (a bare name is also held against
    the name part of ``org/name``), the closest first."""
    wanted = spec.lower()

    def score(name: str) -> float:
        ratios = [name.lower(), *([name.lower().rpartition("/")[2]] if "/" not in wanted else [])]
        return max(difflib.SequenceMatcher(None, wanted, r).ratio() for r in ratios)

    scored = sorted((-score(n), n) for n in set(names))
    return [n for s, n in scored if -s >= CLOSE][:3]


def hub_problem(spec: str) -> str | None:
    """What is wrong with a hub id on the hub (None: a model the token in use can load). Asked once
    per process and endpoint."""
    from huggingface_hub import constants

    return _ask_hub(spec, constants.ENDPOINT)


@functools.lru_cache(maxsize=256)
def _ask_hub(spec: str, endpoint: str) -> str | None:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    api = HfApi(endpoint=endpoint)
    try:
        if api.model_info(spec, timeout=HUB_TIMEOUT_S).gated:
            api.auth_check(spec)  # the listing is public; the files are not
    except GatedRepoError:
        has = "the token in use (HF_TOKEN) has no access to it" if get_token() else "HF_TOKEN is not set"
        return (
            f"model {spec} is gated and {has}: HF_TOKEN needs access to it "
            f"(ask for it at {endpoint}/{spec}, then set HF_TOKEN to a token of that account)"
        )
    except (RepositoryNotFoundError, ValueError):  # ValueError: not a valid repo id
        return _unknown(spec, f"on the hub {endpoint}", _hub_names(api, spec))
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            return (
                f"model {spec}: the hub {endpoint} refused the token in use (HF_TOKEN is not a valid token)"
            )
        return _unreachable(spec, endpoint, e)
    except Exception as e:  # httpx's network errors share no base class with OSError
        if not _network_error(e):
            raise
        return _unreachable(spec, endpoint, e)
    return None


def local_problem(spec: str) -> str:
    """Why ``spec``, offline and not in the local hub cache (config and weights), is no model."""
    from speed_ray.io.models import folder_problem

    snapshot = cached_snapshot(spec)
    if snapshot is not None:
        return (
            f"model {spec} is only partly in the local Hugging Face cache ({folder_problem(snapshot)}), "
            "and HF_HUB_OFFLINE is set: the hub is not asked for the rest"
        )
    return _unknown(spec, "", [])


def _unknown(spec: str, where: str, hub_names: list[str]) -> str:
    from speed_ray.io.models import builtin_names

    names = builtin_names()
    close = closest(spec, [n for n in (*names, *cached_models(), *hub_names) if n != spec])
    if where:
        expected = "or a hub model id as org/name (a private one needs HF_TOKEN with access)"
    else:
        expected = (
            f"or a model in the local Hugging Face cache {cache_folder()} "
            "(HF_HUB_OFFLINE is set: the hub is not asked)"
        )
    return (
        f"unknown model {spec!r}{' ' + where if where else ''}"
        + (f"; did you mean {' or '.join(close)}?" if close else "")
        + f" (expected a built-in name: {', '.join(names)}; a model folder; {expected})"
    )


def _hub_names(api, spec: str) -> list[str]:
    """Hub ids to offer for a typo: the org's models, and those whose id holds the name's longest word."""
    org, _, name = spec.rpartition("/")
    word = max(name.replace("_", "-").replace(".", "-").split("-"), key=len)
    queries = [{"author": org}] if org else []
    queries += [{"search": word}] if word else []
    found: list[str] = []
    for query in queries:
        try:
            found += [m.id for m in api.list_models(**query, limit=SEARCH_LIMIT)]
        except Exception as e:  # the search only adds suggestions: the model is unknown either way
            if not (_network_error(e) or isinstance(e, (OSError, ValueError))):
                raise
    return found


def _unreachable(spec: str, endpoint: str, error: Exception) -> str:
    detail = (str(error).splitlines() or [""])[0][:160]
    return (
        f"cannot check model {spec!r}: the hub {endpoint} could not be reached ({type(error).__name__}: "
        f"{detail}); to run offline, set HF_HUB_OFFLINE=1 and name only local models (built-in names, "
        f"model folders, models in the local Hugging Face cache {cache_folder()})"
    )


def _network_error(error: Exception) -> bool:
    """A failure to talk to the hub at all (a refused connection, no name resolution, a timeout)."""
    from huggingface_hub import errors

    return isinstance(error, (OSError, getattr(errors, "HTTPError", OSError)))
