@echo off
rem Adapter Studio launcher (Windows), a plain mirror of launch.sh.
rem   launch.bat [app options]          first run: create .venv, install PyTorch + requirements; then start the studio
rem   launch.bat --test [pytest options] run the test suite in the same environment
rem STUDIO_TORCH=cpu^|cu126^|cu128 picks the PyTorch build (default: cu128 when nvidia-smi finds a GPU, else cpu).
setlocal EnableExtensions EnableDelayedExpansion
set "HERE=%~dp0"
if "%HERE:~-1%"=="\" set "HERE=%HERE:~0,-1%"
cd /d "%HERE%"
set "VENV=%HERE%\.venv"
set "TORCH_VERSION=2.13.0"

if not exist "%VENV%\Scripts\python.exe" (
    set "PY=%STUDIO_PYTHON%"
    if "!PY!"=="" (
        where py >nul 2>nul && (set "PY=py -3") || (set "PY=python")
    )
    echo Creating the environment in %VENV% ^(first run only^)...
    !PY! -m venv "%VENV%" || (echo Adapter Studio needs Python 3.10 to 3.13; install it from python.org and run this again. & exit /b 1)
)
set "VPY=%VENV%\Scripts\python.exe"

set "VARIANT=%STUDIO_TORCH%"
if "%VARIANT%"=="" (
    set "VARIANT=cpu"
    where nvidia-smi >nul 2>nul && nvidia-smi -L >nul 2>nul && set "VARIANT=cu128"
)

rem Re-install when the PyTorch build or requirements.txt changed since the last install
rem (launch.sh compares hashes; here fc compares against the copy kept in .venv).
set "NEED="
set "HAVE="
if exist "%VENV%\.studio-torch" set /p HAVE=<"%VENV%\.studio-torch"
if not "%HAVE%"=="torch=%TORCH_VERSION%-%VARIANT%" set "NEED=1"
fc /b "%HERE%\requirements.txt" "%VENV%\.studio-requirements.txt" >nul 2>nul || set "NEED=1"
if defined NEED (
    echo Installing PyTorch %TORCH_VERSION% ^(%VARIANT%^) and the studio's requirements...
    "%VPY%" -m pip install --disable-pip-version-check --retries 1 --timeout 30 "torch==%TORCH_VERSION%" --extra-index-url "https://download.pytorch.org/whl/%VARIANT%" || exit /b 1
    "%VPY%" -m pip install --disable-pip-version-check -r "%HERE%\requirements.txt" || exit /b 1
    > "%VENV%\.studio-torch" echo torch=%TORCH_VERSION%-%VARIANT%
    copy /y "%HERE%\requirements.txt" "%VENV%\.studio-requirements.txt" >nul
)

if "%~1"=="--test" goto run_tests
"%VPY%" "%HERE%\app.py" %*
exit /b %errorlevel%

:run_tests
fc /b "%HERE%\requirements-dev.txt" "%VENV%\.studio-requirements-dev.txt" >nul 2>nul
if errorlevel 1 (
    "%VPY%" -m pip install --disable-pip-version-check -r "%HERE%\requirements-dev.txt" || exit /b 1
    copy /y "%HERE%\requirements-dev.txt" "%VENV%\.studio-requirements-dev.txt" >nul
)
set "ARGS="
shift
:collect
if "%~1"=="" goto pytest
set "ARGS=%ARGS% %1"
shift
goto collect
:pytest
"%VPY%" -m pytest %ARGS%
exit /b %errorlevel%
