from mpnp.answers import ANSWER_VOCAB, QUESTION_TYPES, exact_match, normalize_answer


def test_vocabulary_is_nuscenes_qa():
    assert len(ANSWER_VOCAB) == 30 and len(set(ANSWER_VOCAB)) == 30
    assert QUESTION_TYPES == ("exist", "count", "object", "status", "comparison")


def test_normalisation_maps_variants_to_the_vocabulary():
    assert normalize_answer(" Yes.\nmore text") == "yes"
    assert normalize_answer("Answer: two") == "2"
    assert normalize_answer("the traffic cones") == "traffic cone"
    assert normalize_answer("Construction  Vehicle!") == "construction vehicle"
    assert all(normalize_answer(a) == a for a in ANSWER_VOCAB)
    assert exact_match("Parked", "parked") and not exact_match("parked", "moving")
    assert normalize_answer("purple") == "purple"  # not snapped: counts as wrong
