"""The job lifecycle's one table (issue 17): complete, and the picture in docs/architecture.md is
drawn from it."""

from __future__ import annotations

from app.lifecycle import OWNER_ACTIONS, SERVICE_MOVES, state_diagram
from app.models import JobStatus
from tests.conftest import REPO


def test_every_status_has_its_owner_actions_and_is_reachable():
    assert set(OWNER_ACTIONS) == set(JobStatus.ALL)
    reached = {JobStatus.QUEUED} | {after for _, after, _, _ in SERVICE_MOVES}
    reached |= {target for actions in OWNER_ACTIONS.values() for target in actions.values()}
    assert set(JobStatus.ALL) <= reached


def test_the_architecture_page_shows_the_tables_diagram():
    page = (REPO / "docs" / "architecture.md").read_text()
    assert "```mermaid\n" + state_diagram() + "\n```" in page


def test_the_readme_lists_every_error_code_as_app_errors_defines_it():
    from app.errors import error_table

    assert error_table() in (REPO / "README.md").read_text()
