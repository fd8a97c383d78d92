-- A row rule across columns: Managers must belong to a team.

rollcall.check_row(function(row, ctx)
  if ctx.operation == "add" and row["Role"] == "Manager" and row["Team"] == "" then
    return { column = "Team", message = "A Manager must have a team. Choose one from the drop-down." }
  end
end)
