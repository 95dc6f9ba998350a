"""DVTS (diverse verifier tree search): the particles split into N / beam_width subtrees of
beam_width; each keeps its best particle by PRM score and extends it beam_width ways."""

from pf_engine.search.beam_search import BeamSearch


class DVTS(BeamSearch):
    def group(self) -> int:
        return self.config.beam_width
