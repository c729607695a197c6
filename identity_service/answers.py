"""The answers of the HTTP services the service calls (event destinations, AMP webhooks):
the status line and header fields decide; the body is read only to free the connection,
and never whole."""

import aiohttp

# How much of an answer's body is read (and dropped: the status is the answer), so the
# connection goes back to the pool; a longer body closes the connection instead.
MAX_ANSWER_BYTES = 64 * 1024


async def drain_answer(answer: aiohttp.ClientResponse) -> None:
    """Read and drop up to ``MAX_ANSWER_BYTES`` of the body, so the connection can be
    used again; a longer one, or one that fails or times out, closes the connection."""
    left = MAX_ANSWER_BYTES
    try:
        while left > 0:
            chunk = await answer.content.read(left)
            if not chunk:
                return
            left -= len(chunk)
        if not answer.content.at_eof():
            answer.close()
    except (aiohttp.ClientError, TimeoutError, OSError):
        answer.close()
