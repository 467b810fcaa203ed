"""Live pages: what a page has open is told the moment it changes (Server-Sent Events).

Services announce a change of a node or a rollout (`services.announce`, after their
transaction commits) on a Redis channel; a page holds one event stream (`views`) that
forwards each announcement as a `changed` event, and htmx then fetches the page's live part
as its poll would. Nothing but "changed" travels: the page asks for what it may see through
the same view as ever. An announcement may be lost (Redis down, a stream between two
connections): the pages keep a slow poll, and fall back to their fast one while their stream
is not open."""
