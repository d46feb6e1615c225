# Removes the Start-menu shortcut created by create_shortcut.ps1.
$programs = [Environment]::GetFolderPath('Programs')
Remove-Item -ErrorAction SilentlyContinue (Join-Path $programs 'VPTQ Chat.lnk')
