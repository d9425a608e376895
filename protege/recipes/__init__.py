"""Recipe YAML files shipped with protege (`protege train <file>` accepts them as-is)."""

from pathlib import Path

RECIPES = Path(__file__).parent


def recipe_path(name: str) -> Path:
    path = RECIPES / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(p.stem for p in RECIPES.glob("*.yaml"))
        raise ValueError(f"no builtin recipe {name!r}; known: {known}")
    return path
