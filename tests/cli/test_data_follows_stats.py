"""Text options left at their defaults follow the windows a statistics folder recorded."""

from kvtool.options import DataOptions


def test_defaults_follow_the_recorded_windows_and_explicit_values_win():
    recorded = {"dataset": "/data/notes.txt", "split": "calib", "text_field": "body", "samples": 2, "seq_len": 32,
                "seed": 5}
    followed = DataOptions().following(recorded)
    assert (followed.dataset, followed.text_field, followed.samples, followed.seq_len, followed.seed) == \
        ("/data/notes.txt", "body", 2, 32, 5)
    mine = DataOptions(seq_len=64, samples=8).following(recorded)
    assert (mine.seq_len, mine.samples, mine.dataset) == (64, 8, "/data/notes.txt")
    assert DataOptions(batch_size=8).following({"batch_size": 1}).batch_size == 8
    assert DataOptions().following(None) == DataOptions()
