-- Cost Centre: one of the finance department's codes (a drop-down in the template).

rollcall.column {
  name = "Cost Centre",
  help = "The cost centre that pays for the user's licence.",
  example = "CC-100 Sales",
  choices = { "CC-100 Sales", "CC-200 Engineering", "CC-300 Operations", "CC-900 Board" },
}

-- The board's cost centre is for Admins only; others get a warning, not an error.
rollcall.check("Cost Centre", function(value, row)
  if value == "CC-900 Board" and row["Role"] ~= "" and row["Role"] ~= "Admin" then
    return rollcall.warning("CC-900 Board is meant for Admins; check that this user belongs there.")
  end
end)
