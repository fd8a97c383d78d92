-- Manager Email: the user's line manager, who must be a user already or be added by the
-- same file (rollcall checks that for a column declared with user_reference = true).

rollcall.column {
  name = "Manager Email",
  help = "Email of the user's line manager: an existing user, or one added in this file.",
  example = "grace.hopper@example.com",
  max_length = 254,
  user_reference = true,
}

rollcall.normalise("Manager Email", function(value)
  return value:lower()
end)

rollcall.check("Manager Email", function(value, row, ctx)
  if value == (row["Email"] or ""):lower() then
    return "A user cannot be their own manager."
  end
  local m = ctx.user(value)
  if m and m.status ~= "active" then
    return rollcall.warning("The manager " .. value .. " is deactivated.")
  end
end)
