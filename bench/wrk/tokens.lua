-- Rotates through a token file (one token a line), one token per request.
-- Usage: wrk -s bench/wrk/tokens.lua URL -- TOKENS_FILE
local requests = {}
local i = 0

function init(args)
  for line in io.lines(args[1]) do
    requests[#requests + 1] = wrk.format("GET", nil, { ["Authorization"] = "Bearer " .. line })
  end
  -- Each wrk thread starts at a different place in the file.
  i = math.random(#requests) - 1
end

function request()
  i = (i % #requests) + 1
  return requests[i]
end
