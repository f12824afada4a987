"""What every tab gets: settings, the workspace and the shared base-model picker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from studio.places import Settings, Workspace


@dataclass
class AppContext:
    settings: Settings
    workspace: Workspace
    models_dirs: list[str] = field(default_factory=list)
    model_picker: Any = None  # gr.Dropdown shared by the tabs; its value is a model spec string
    tabs: Any = None  # gr.Tabs, so one tab can switch to another (e.g. open a result in Inspect)
    components: dict = field(default_factory=dict)  # cross-tab components, by name (e.g. "inspect_path")
    # Callbacks run once every tab is built, for wiring that crosses tabs (e.g. "open in Inspect").
    on_built: list = field(default_factory=list)
    # True when the studio is reachable from other machines (share link, LAN address): folder
    # settings are then read-only in the browser, so a guest cannot widen what the studio may open.
    remote: bool = False

    def roots(self) -> list[str]:
        """The folders a browser request may read or write: the workspace and the model folders."""
        import os

        s = self.settings
        uploads = [os.environ["GRADIO_TEMP_DIR"]] if os.environ.get("GRADIO_TEMP_DIR") else []
        return [str(self.workspace.root), *s.models_dirs, *s.lora_dirs, *s.data_dirs, *uploads]

    def safe_path(self, path, must_exist: bool = False):
        """Every path typed or sent from a browser goes through here (no .., no symlink out)."""
        from studio.security import safe_path

        return safe_path(path, self.roots(), must_exist=must_exist)
