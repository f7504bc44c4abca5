"""What the benchmarks ran on: the CPU's name, for the line each prints (the one ``minigpt config --size`` uses)."""

from __future__ import annotations

from minigpt_cli.flops import cpu_name

__all__ = ["cpu_name"]
