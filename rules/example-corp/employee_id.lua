-- Employee ID: every user carries their HR number, two letters and six digits.
-- Typed in lower case, it is stored in upper case (the preview lists the change).

rollcall.column {
  name = "Employee ID",
  help = "Your HR number: two letters and six digits.",
  example = "AB123456",
  required = true,
  max_length = 8,
  operations = { "add", "update" },
}

rollcall.normalise("Employee ID", function(value)
  return value:upper()
end)

rollcall.check("Employee ID", function(value)
  if not value:match("^%u%u%d%d%d%d%d%d$") then
    return "Employee ID must be two letters and six digits, as in AB123456."
  end
end)
