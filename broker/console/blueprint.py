"""The console's Blueprint object (its own module so views and tests import it without cycles)."""
from __future__ import annotations

from flask import Blueprint

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates")
