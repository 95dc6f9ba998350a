"""Self-consistency: N independent samples and no PRM; every particle weighs the same and a
majority vote over equivalent answers picks the answer."""

from pf_engine.search.algorithm import Algorithm, StopsEarly


class SelfConsistency(StopsEarly, Algorithm):
    scores = False
    votes = True
