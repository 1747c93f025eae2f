"""The edit maths inside attention layers, for every family: the run's plan and state, cross- and self-attention
(`cross`), joint attention (`joint`) and local blending (`blend`). Families build their processors on these."""
