"""The one error analyses raise for inputs they cannot use (standard library only, so the light
analysis modules can raise it without loading the training stack)."""


class AnalysisInputError(ValueError):
    """A workdir, a set of workdirs or an analysis request that cannot be analysed."""
