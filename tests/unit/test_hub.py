"""Hub: a worker's registry of connections by user and channel, and its transitions."""

from __future__ import annotations

from manydoors.server.hub import Hub, channels_of


class Member:
    """The two attributes the hub reads and writes on a connection."""

    __slots__ = ("channels", "user")

    def __init__(self) -> None:
        self.user: str | None = None
        self.channels: str | tuple[str, ...] = ()


def joined(hub: Hub, *members: Member) -> None:
    for member in members:
        hub.add(member)


# --- add, remove, len ------------------------------------------------------------------


def test_a_new_hub_is_empty() -> None:
    hub = Hub()
    assert len(hub) == 0
    assert hub.channels == {}
    assert hub.users == {}


def test_add_counts_connections() -> None:
    hub = Hub()
    a, b = Member(), Member()
    joined(hub, a, b)
    assert len(hub) == 2
    assert hub.conns == {a, b}


def test_removing_an_anonymous_connection_loses_nothing() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    assert hub.remove(a) == ([], None)
    assert len(hub) == 0


def test_removing_a_connection_twice_is_harmless() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    hub.subscribe(a, "news")
    hub.remove(a)
    assert hub.remove(a) == ([], None)


# --- subscribe / unsubscribe transitions ----------------------------------------------


def test_first_subscriber_of_a_channel_is_a_transition() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    assert hub.subscribe(a, "news") is True
    assert channels_of(a) == ("news",)
    assert hub.channels == {"news": {a}}


def test_second_subscriber_of_a_channel_is_not_a_transition() -> None:
    hub = Hub()
    a, b = Member(), Member()
    joined(hub, a, b)
    assert hub.subscribe(a, "news") is True
    assert hub.subscribe(b, "news") is False
    assert hub.channels["news"] == {a, b}


def test_subscribing_twice_is_not_a_transition_and_not_a_duplicate() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    hub.subscribe(a, "news")
    assert hub.subscribe(a, "news") is False
    assert channels_of(a) == ("news",)


def test_each_channel_has_its_own_first_subscriber() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    assert hub.subscribe(a, "news") is True
    assert hub.subscribe(a, "sport") is True
    assert channels_of(a) == ("news", "sport")


def test_unsubscribing_the_last_subscriber_is_a_transition() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    hub.subscribe(a, "news")
    assert hub.unsubscribe(a, "news") is True
    assert channels_of(a) == ()
    assert "news" not in hub.channels


def test_unsubscribing_while_others_remain_is_not_a_transition() -> None:
    hub = Hub()
    a, b = Member(), Member()
    joined(hub, a, b)
    hub.subscribe(a, "news")
    hub.subscribe(b, "news")
    assert hub.unsubscribe(a, "news") is False
    assert hub.unsubscribe(b, "news") is True
    assert hub.channels == {}


def test_unsubscribing_a_channel_never_subscribed_is_not_a_transition() -> None:
    hub = Hub()
    a, b = Member(), Member()
    joined(hub, a, b)
    hub.subscribe(b, "news")
    assert hub.unsubscribe(a, "news") is False
    assert hub.unsubscribe(a, "other") is False
    assert hub.channels == {"news": {b}}  # b's subscription is untouched


def test_unsubscribing_twice_is_a_transition_only_once() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    hub.subscribe(a, "news")
    assert hub.unsubscribe(a, "news") is True
    assert hub.unsubscribe(a, "news") is False


def test_unsubscribe_keeps_the_other_channels_in_order() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    for ch in ("a", "b", "c"):
        hub.subscribe(a, ch)
    hub.unsubscribe(a, "b")
    assert channels_of(a) == ("a", "c")


def test_resubscribing_after_the_channel_emptied_is_a_transition_again() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    hub.subscribe(a, "news")
    hub.unsubscribe(a, "news")
    assert hub.subscribe(a, "news") is True


def test_subscribers_share_one_interned_channel_string() -> None:
    hub = Hub()
    a, b = Member(), Member()
    joined(hub, a, b)
    hub.subscribe(a, "".join(["ne", "ws-1"]))
    hub.subscribe(b, "".join(["new", "s-1"]))
    assert channels_of(a)[0] is channels_of(b)[0]


# --- set_user --------------------------------------------------------------------------


def test_naming_the_first_connection_of_a_user_is_a_transition() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    assert hub.set_user(a, "alice") == (True, None)
    assert a.user == "alice"
    assert hub.of_user("alice") == (a,)


def test_hello_again_as_the_same_user_changes_nothing() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    hub.set_user(a, "alice")
    assert hub.set_user(a, "alice") == (False, None)
    assert hub.of_user("alice") == (a,)


def test_a_second_connection_of_the_same_user_is_not_a_transition() -> None:
    hub = Hub()
    a, b = Member(), Member()
    joined(hub, a, b)
    assert hub.set_user(a, "alice") == (True, None)
    assert hub.set_user(b, "alice") == (False, None)
    assert set(hub.of_user("alice")) == {a, b}


def test_a_third_connection_of_the_same_user_joins_the_others() -> None:
    hub = Hub()
    a, b, c = Member(), Member(), Member()
    joined(hub, a, b, c)
    for m in (a, b, c):
        hub.set_user(m, "alice")
    assert set(hub.of_user("alice")) == {a, b, c}


def test_one_connection_of_a_user_is_stored_flat() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    hub.set_user(a, "alice")
    assert hub.users["alice"] is a


def test_rehello_as_another_user_loses_the_old_one() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    hub.set_user(a, "alice")
    assert hub.set_user(a, "bob") == (True, "alice")
    assert a.user == "bob"
    assert hub.of_user("alice") == ()
    assert hub.of_user("bob") == (a,)
    assert "alice" not in hub.users


def test_rehello_as_another_user_keeps_the_old_user_if_another_connection_has_it() -> None:
    hub = Hub()
    a, b = Member(), Member()
    joined(hub, a, b)
    hub.set_user(a, "alice")
    hub.set_user(b, "alice")
    assert hub.set_user(a, "bob") == (True, None)
    assert hub.of_user("alice") == (b,)
    assert hub.users["alice"] is b  # back to flat with one connection left
    assert hub.of_user("bob") == (a,)


def test_rehello_as_a_user_already_held_is_neither_new_nor_lost() -> None:
    hub = Hub()
    a, b, c = Member(), Member(), Member()
    joined(hub, a, b, c)
    hub.set_user(a, "alice")
    hub.set_user(b, "alice")
    hub.set_user(c, "bob")
    assert hub.set_user(a, "bob") == (False, None)
    assert set(hub.of_user("bob")) == {a, c}
    assert hub.of_user("alice") == (b,)


def test_rehello_moves_the_only_connection_from_one_held_user_to_another() -> None:
    hub = Hub()
    a, b = Member(), Member()
    joined(hub, a, b)
    hub.set_user(a, "alice")
    hub.set_user(b, "bob")
    assert hub.set_user(a, "bob") == (False, "alice")


def test_set_user_keeps_the_connections_channels() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    hub.subscribe(a, "news")
    hub.set_user(a, "alice")
    hub.set_user(a, "bob")
    assert channels_of(a) == ("news",)
    assert hub.channels == {"news": {a}}


# --- remove ----------------------------------------------------------------------------


def test_remove_returns_the_channels_and_user_this_worker_lost() -> None:
    hub = Hub()
    a = Member()
    hub.add(a)
    hub.set_user(a, "alice")
    hub.subscribe(a, "news")
    hub.subscribe(a, "sport")
    assert hub.remove(a) == (["news", "sport"], "alice")
    assert len(hub) == 0
    assert hub.channels == {}
    assert hub.users == {}
    assert channels_of(a) == ()


def test_remove_loses_only_the_channels_nobody_else_holds() -> None:
    hub = Hub()
    a, b = Member(), Member()
    joined(hub, a, b)
    for ch in ("news", "sport", "tv"):
        hub.subscribe(a, ch)
    hub.subscribe(b, "sport")
    lost, user = hub.remove(a)
    assert lost == ["news", "tv"]
    assert user is None
    assert hub.channels == {"sport": {b}}


def test_remove_keeps_a_user_that_has_another_connection() -> None:
    hub = Hub()
    a, b = Member(), Member()
    joined(hub, a, b)
    hub.set_user(a, "alice")
    hub.set_user(b, "alice")
    assert hub.remove(a) == ([], None)
    assert hub.of_user("alice") == (b,)
    assert hub.remove(b) == ([], "alice")
    assert hub.of_user("alice") == ()


def test_remove_of_the_last_of_three_connections_loses_the_user() -> None:
    hub = Hub()
    members = [Member(), Member(), Member()]
    joined(hub, *members)
    for m in members:
        hub.set_user(m, "alice")
    gone = [hub.remove(m)[1] for m in members]
    assert gone == [None, None, "alice"]
    assert hub.users == {}


def test_remove_leaves_other_connections_alone() -> None:
    hub = Hub()
    a, b = Member(), Member()
    joined(hub, a, b)
    hub.set_user(b, "bob")
    hub.subscribe(b, "news")
    hub.remove(a)
    assert hub.conns == {b}
    assert hub.of_user("bob") == (b,)
    assert hub.channels == {"news": {b}}


# --- of_user ---------------------------------------------------------------------------


def test_of_user_of_an_unknown_user_is_empty() -> None:
    assert Hub().of_user("nobody") == ()


def test_of_user_returns_every_connection_of_the_user() -> None:
    hub = Hub()
    a, b, c = Member(), Member(), Member()
    joined(hub, a, b, c)
    hub.set_user(a, "alice")
    hub.set_user(b, "alice")
    hub.set_user(c, "bob")
    assert set(hub.of_user("alice")) == {a, b}
    assert list(hub.of_user("bob")) == [c]
