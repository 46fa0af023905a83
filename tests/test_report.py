"""The participant report's reading aids (the page itself is rendered in test_participant)."""

from bids_fcd.report import discordance_note


def test_discordant_calls_are_explained_and_concordant_ones_are_not():
    assert "no region reached the voxel threshold" in discordance_note("fcd", 0)
    assert "review them" in discordance_note("control", 2)
    assert discordance_note("fcd", 1) == "" and discordance_note("control", 0) == ""
