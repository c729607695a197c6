-- Shared by flow.lua and collect.lua: count an answer, and stop after BENCH_MAX_REQUESTS of
-- them (bench/instructions.py; wrk is otherwise bound by time). The thread stops; wrk
-- reports once instructions.py, reading "BENCH_DONE", interrupts it.
local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "")
local answered = 0

return function()
  answered = answered + 1
  if max_requests ~= nil and answered >= max_requests then
    io.write("BENCH_DONE\n")
    io.flush()
    wrk.thread:stop()
  end
end
